"""Data-parallel training with real torchrun processes (2 ranks, gloo on CPU)."""
import json
import os
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from .helpers import TINY, python_corpus, varlen_cmd

STEPS = 30


def _opts(corpus, *extra):
    # float32: 2 ranks must match 1 process to 1e-5, and bf16 autocast (train.dtype auto on a CPU with bf16
    # matrix units) rounds differently when the rows are split differently. The killed job shares the runs.
    return ["--corpus", str(corpus), "--data.glob", "*.py", "--no-progress", *TINY, "--train.max_steps", str(STEPS),
            "--train.ckpt_every", "3", "--train.eval_every", "10", "--train.keep_last", "20",
            "--train.dtype", "float32", *extra]


def _weights(run, step=STEPS):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))


def _metrics(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _train(*args, timeout=300):
    res = subprocess.run(varlen_cmd("train", *args), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _tree(pid):
    """pid and all its descendants (torchrun starts each rank in a session of its own, so killpg misses them)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += parents.get(p, [])
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return python_corpus(tmp_path_factory.mktemp("dist") / "corpus")


@pytest.fixture(scope="module")
def two_rank_run(corpus):
    out = corpus.parent / "two"
    res = _train("--nproc", "2", "--out", str(out), *_opts(corpus))
    return out, res


# dd with 64 tokens a step: a step of the 64-token bucket is one chunk, so one rank gets nothing and must
# still join the all-reduce.
@pytest.mark.parametrize("batching, split, tokens", [("pack", "cost", 512), ("dd", "round_robin", 64)])
def test_two_ranks_equal_one_process(corpus, two_rank_run, batching, split, tokens):
    extra = ["--data.batching", batching, "--data.tokens_per_step", str(tokens)]
    one = corpus.parent / f"one-{batching}"
    _train("--out", str(one), *_opts(corpus, *extra))
    if (batching, split) == ("pack", "cost"):
        two, res = two_rank_run
    else:
        two = corpus.parent / f"two-{batching}-{split}"
        res = _train("--nproc", "2", "--out", str(two), *_opts(corpus, *extra, "--data.balance", split))
    assert res.stderr.count("done: step") == 1, "only rank 0 should report"
    m = _metrics(two)
    shares = [r["rank_tokens"] for r in m.values()]
    assert all(len(r["rank_tokens"]) == 2 and sum(r["rank_tokens"]) == r["tokens"] for r in m.values())
    if tokens == 64:
        assert any(min(s) == 0 for s in shares), "no step left a rank empty; the test proved nothing"
    else:
        assert all(min(s) > 0 for s in shares), "each rank must have trained on its own share"
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, f"2-rank weights differ from 1-process weights by {diff}"
    single = _metrics(one)
    for step in (1, STEPS):
        assert m[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5)
        assert m[step]["tokens"] == single[step]["tokens"]


def test_killed_torchrun_job_resumes_exactly(corpus, two_rank_run):
    full, _ = two_rank_run
    kill_and_resume(corpus.parent / "killed", _opts(corpus), full, STEPS)


def kill_and_resume(killed, opts: list[str], full, steps: int) -> None:
    """Start a 2-rank job, SIGKILL it after its first checkpoint (the launcher and both ranks at once, as a
    cluster scheduler would), resume it, and check it ends bitwise equal to the uninterrupted run `full`."""
    proc = subprocess.Popen(varlen_cmd("train", "--nproc", "2", "--out", str(killed), *opts),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_0000003").exists():
        assert proc.poll() is None and time.time() < deadline, "job ended before its first checkpoint"
        time.sleep(0.002)
    for pid in _tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    n = max(int(p.name[5:]) for p in (killed / "checkpoints").glob("step_*"))
    assert n < steps, "the job finished before the kill; the test proved nothing"

    res = _train("--nproc", "2", "--resume", str(killed), "--no-progress")
    assert f"from step_{n:07d}" in res.stderr
    want, got = _metrics(full), _metrics(killed)
    assert sorted(got) == sorted(want)
    for step in range(n + 1, steps + 1):
        assert got[step]["loss"] == want[step]["loss"], step  # bitwise
    a, b = _weights(full, steps), _weights(killed, steps)
    assert all(bool((a[k] == b[k]).all()) for k in a)


def test_nproc_above_cores_needs_force(tmp_path):
    res = subprocess.run(varlen_cmd("train", "--nproc", str((os.cpu_count() or 1) + 1), "--out", str(tmp_path / "r")),
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--nproc" in res.stderr and "--force" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_collectives_use_the_backends_device(monkeypatch):
    # NCCL reduces only CUDA tensors; no GPU here, so the choice alone is checked (gloo runs above for real).
    import torch
    from varlen.train import dist as vdist
    monkeypatch.setattr(vdist.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert vdist.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(vdist.dist, "get_backend", lambda: "gloo")
    assert vdist.collective_device() == torch.device("cpu")
