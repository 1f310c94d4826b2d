"""Sequence-parallel training with real torchrun processes (2 ranks, gloo on CPU): documents longer than one
rank holds (data.rank_tokens) train whole across both ranks, and the run equals one process that holds them."""
import subprocess

import pytest

from varlen.data.corpus import stdlib_files

from .helpers import TINY, python_corpus, varlen_cmd
from .test_dist import _metrics, _train, _weights, kill_and_resume

STEPS = 12
SP = ["--data.rank_tokens", "32", "--dist.sp", "auto"]


def _opts(corpus, *extra):
    # TINY: max_seq_len 64, so pieces of up to 64 tokens; rank_tokens 32 makes every piece longer than 32 train
    # split over the two ranks. float32: 2 ranks must match 1 process to 1e-5 (see test_dist).
    return ["--corpus", str(corpus), "--data.glob", "*.py", "--no-progress", *TINY, "--train.max_steps", str(STEPS),
            "--train.ckpt_every", "3", "--train.keep_last", "20", "--train.eval_every", "0", "--train.dtype", "float32",
            *extra]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return python_corpus(tmp_path_factory.mktemp("sp") / "corpus")


@pytest.fixture(scope="module")
def one_process(corpus):
    out = corpus.parent / "one"
    _train("--out", str(out), *_opts(corpus))
    return out


@pytest.mark.parametrize("sp", ["auto", "2"])
def test_two_sequence_parallel_ranks_equal_one_process(corpus, one_process, sp):
    two = corpus.parent / f"two-sp{sp}"
    _train("--nproc", "2", "--out", str(two), *_opts(corpus, "--data.rank_tokens", "32", "--dist.sp", sp))
    m = _metrics(two)
    degrees = [r["sp_degrees"] for r in m.values()]
    if sp == "2":
        assert all(d == [2, 2] for d in degrees)
    else:
        # pieces of 33-64 tokens exist in most steps: those steps split; the test needs some of each kind
        assert any(d == [2, 2] for d in degrees), "no step was split; the test proved nothing"
    # what each rank held never exceeds its cap in a split row... and the step's tokens are all there
    assert all(sum(r["rank_tokens"]) == r["tokens"] for r in m.values())
    a, b = _weights(one_process, STEPS), _weights(two, STEPS)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, f"sequence-parallel weights differ from 1-process weights by {diff}"
    single = _metrics(one_process)
    for step in (1, STEPS):
        assert m[step]["loss"] == pytest.approx(single[step]["loss"], rel=1e-5)
        assert m[step]["tokens"] == single[step]["tokens"]


def test_killed_sequence_parallel_job_resumes_exactly(corpus):
    full = corpus.parent / "sp-full"
    _train("--nproc", "2", "--out", str(full), *_opts(corpus, *SP))
    kill_and_resume(corpus.parent / "sp-killed", _opts(corpus, *SP), full, STEPS)


@pytest.mark.parametrize("extra, words", [
    (["--nproc", "2", "--dist.sp", "3"], ["dist.sp 3", "divide"]),
    (["--data.rank_tokens", "32", "--dist.sp", "off"], ["data.rank_tokens", "dist.sp auto"]),
    (["--data.rank_tokens", "32"], ["one process", "--nproc"]),
    (["--nproc", "2", "--data.rank_tokens", "16"], ["data.rank_tokens", "raise"]),
    (["--nproc", "2", "--data.rank_tokens", "32", "--data.batching", "concat_chunk"], ["data.batching", "pack or dd"]),
])
def test_bad_sequence_parallel_options_fail_clearly(corpus, tmp_path, extra, words):
    res = subprocess.run(varlen_cmd("train", "--out", str(tmp_path / "r"), *_opts(corpus, *extra)),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert all(w in res.stderr for w in words), res.stderr[-2000:]


def mixed_corpus(dest):
    """Mostly short documents and a few of 33-64 tokens: steps where only some pieces need two ranks."""
    dest.mkdir(parents=True, exist_ok=True)
    files = [p for p in stdlib_files() if p.stat().st_size > 2000][:90]
    for i, p in enumerate(files):
        text = p.read_text(errors="replace")
        (dest / f"{i:03d}.py").write_text(text[:150] if i % 9 == 0 else text[:50])
    return dest


def test_four_ranks_mix_data_and_sequence_parallel_groups(tmp_path):
    # 4 ranks on this 2-core machine (--force): a step splits its long pieces over a pair of ranks while the
    # other two train short ones alone. Still one process's gradients.
    corpus = mixed_corpus(tmp_path / "corpus")
    opts = _opts(corpus, "--data.tokens_per_step", "256", "--data.val_fraction", "0.05")
    _train("--out", str(tmp_path / "one"), *opts)
    _train("--nproc", "4", "--force", "--out", str(tmp_path / "four"), *opts, *SP, timeout=600)
    m = _metrics(tmp_path / "four")
    degrees = [r["sp_degrees"] for r in m.values()]
    assert any(1 in d and max(d) > 1 for d in degrees), f"no step mixed data- and sequence-parallel groups: {degrees}"
    a, b = _weights(tmp_path / "one", STEPS), _weights(tmp_path / "four", STEPS)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-5, f"4-rank sequence-parallel weights differ from 1-process weights by {diff}"


def test_sequence_parallel_dd_steps_equal_one_process(corpus):
    # Dataset Decomposition's buckets of 64-token chunks, each chunk split over both ranks (rank_tokens 32).
    opts = _opts(corpus, "--data.batching", "dd", "--train.max_steps", "6")
    one, two = corpus.parent / "dd-one", corpus.parent / "dd-two"
    _train("--out", str(one), *opts)
    _train("--nproc", "2", "--out", str(two), *opts, *SP)
    assert any(max(r["sp_degrees"]) == 2 for r in _metrics(two).values()), "no step was split"
    a, b = _weights(one, 6), _weights(two, 6)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
