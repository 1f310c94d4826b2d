"""Training: packed loss equals per-document loss, the CLI trains and samples, and a killed run resumes exactly."""
import json
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F

from varlen.batch import Batch
from varlen.cli import main as cli_main
from varlen.config import ModelConfig, TrainConfig
from varlen.data.loader import MicroBatch
from varlen.model.transformer import Transformer
from varlen.train.loop import loss_sum
from varlen.train.schedule import lr_at

from .helpers import TINY, python_corpus, varlen_cmd

CFG = ModelConfig(vocab_size=300, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64)


def micro(docs):
    ids = torch.cat([d[:-1] for d in docs])
    targets = torch.cat([d[1:] for d in docs])
    return MicroBatch(ids, targets, Batch.from_seqlens([len(d) - 1 for d in docs]))


def random_docs(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in lengths]


def test_packed_loss_equals_token_mean_of_documents_run_one_by_one():
    torch.manual_seed(0)
    model = Transformer(CFG)
    docs = random_docs([5, 40, 2, 17, 64, 9], seed=1)
    packed = loss_sum(model, micro(docs), torch.autocast("cpu", enabled=False)) / sum(len(d) - 1 for d in docs)
    total, count = 0.0, 0
    for d in docs:
        logits = model(d[:-1], Batch.from_seqlens([len(d) - 1]))
        total += F.cross_entropy(logits, d[1:], reduction="sum").item()
        count += len(d) - 1
    assert abs(packed.item() - total / count) <= 1e-5


def test_gradient_accumulation_equals_one_big_step():
    """Two micro-batches divided by the step's total target count give the one-row gradient."""
    torch.manual_seed(0)
    model = Transformer(CFG)
    docs = random_docs([30, 3, 50, 11], seed=2)
    no_amp = torch.autocast("cpu", enabled=False)
    n = sum(len(d) - 1 for d in docs)
    (loss_sum(model, micro(docs), no_amp) / n).backward()
    whole = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for part in (docs[:2], docs[2:]):
        (loss_sum(model, micro(part), no_amp) / n).backward()
    for g, p in zip(whole, model.parameters()):
        assert (g - p.grad).abs().max().item() <= 1e-6


def test_schedule_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(5, cfg) == pytest.approx(0.5)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_cli_trains_samples_and_plots(tmp_path, capsys):
    corpus = python_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    rc = cli_main(["train", "--corpus", str(corpus), "--out", str(run), "--no-progress", *TINY,
                   "--data.glob", "*.py", "--train.max_steps", "12", "--train.eval_every", "6",
                   "--train.ckpt_every", "6", "--train.tensorboard", "true"])
    assert rc == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "mfu"} <= set(r)
        assert 0 < r["mfu"] < 1.5  # of the measured matmul peak (a tiny model reaches a few percent)
    # TensorBoard got what metrics.jsonl got, step by step.
    for name in ("loss", "val_loss", "lr", "tokens_per_s", "mfu"):
        want = {r["step"]: r[name] for r in rows if name in r}
        assert board_scalars(run, f"train/{name}") == pytest.approx(want, rel=1e-6), name
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (run / "loss.png").stat().st_size > 1000
    for f in ("model.safetensors", "config.json", "tokenizer.json", "train_state.pt"):
        assert (run / "checkpoints" / "step_0000012" / f).is_file()
    assert (run / "tokenizer.json").is_file()
    # train.dtype auto says what it chose and why (bf16 autocast on a CPU with bf16 matrix units that pay off).
    assert "precision: auto -> " in capsys.readouterr().err
    assert json.loads((run / "data.json").read_text())["dtype"] in ("float32", "bfloat16")

    (run / "loss.png").unlink()
    assert cli_main(["plot", str(run)]) == 0
    assert (run / "loss.png").is_file()

    # Greedy sampling is deterministic and only the generated text goes to stdout.
    outs = []
    for _ in range(2):
        res = subprocess.run(varlen_cmd("sample", str(run), "--prompt", "def ", "--max-new-tokens", "20",
                                        "--temperature", "0"), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] and len(outs[0]) > 1  # an untrained model may well emit only spaces
    res = subprocess.run(varlen_cmd("sample", str(run), "--max-new-tokens", "20", "--temperature", "1.0",
                                    "--top-k", "50", "--top-p", "0.9", "--seed", "3"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def board_scalars(run, tag) -> dict:
    """{step: value} of one TensorBoard scalar in the run dir's event files; each step once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run))
    acc.Reload()
    steps = [e.step for e in acc.Scalars(tag)]
    assert steps == sorted(set(steps)), f"{tag}: steps logged twice or out of order: {steps}"
    return {e.step: e.value for e in acc.Scalars(tag)}


def _losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r.get("val_loss")) for r in rows}, [r["step"] for r in rows]


@pytest.mark.parametrize("batching", ["pack", "dd"])
def test_sigkilled_run_resumes_bitwise(tmp_path, batching):
    corpus = python_corpus(tmp_path / "corpus")
    common = ["--corpus", str(corpus), "--data.glob", "*.py", "--no-progress", *TINY, "--data.batching", batching,
              "--train.max_steps", "60", "--train.ckpt_every", "5", "--train.eval_every", "10",
              "--train.keep_last", "3", "--train.tensorboard", "true"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(varlen_cmd("train", "--out", str(killed), *common),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step_0000005").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    steps_done = [int(p.name[5:]) for p in (killed / "checkpoints").glob("step_*")]
    n = max(steps_done)
    assert n < 60, "the run finished before the kill; the test proved nothing"

    res = subprocess.run(varlen_cmd("train", "--resume", str(killed), "--no-progress"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert f"from step_{n:07d}" in res.stderr
    assert "auto -> " in res.stderr and "as the run chose at its start" in res.stderr  # no second probe

    # The uninterrupted run takes the dtype train.dtype auto chose for the killed one (bf16 on a CPU with bf16
    # matrix units): two processes' probes need not agree on a busy machine.
    chosen = json.loads((killed / "data.json").read_text())["dtype"]
    full = tmp_path / "full"
    subprocess.run(varlen_cmd("train", "--out", str(full), *common, "--train.dtype", chosen), check=True,
                   capture_output=True, timeout=600)
    want, _ = _losses(full)
    got, order = _losses(killed)
    assert order == list(range(1, 61))  # lines logged after the checkpoint by the killed run were dropped
    for step in range(n + 1, 61):
        assert got[step] == want[step], step  # bitwise: floats compared exactly
    # TensorBoard dropped what the killed run logged past its checkpoint, as metrics.jsonl did.
    assert board_scalars(killed, "train/loss") == pytest.approx({s: loss for s, (loss, _) in got.items()}, rel=1e-6)


def test_tensorboard_without_its_package_is_a_clear_config_error(monkeypatch):
    import sys

    from varlen.config import ConfigError
    from varlen.train.loop import summary_writer_class
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(ConfigError, match=r"pip install 'varlen\[tensorboard\]'"):
        summary_writer_class()
