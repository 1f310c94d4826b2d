"""Measure the balancing cost model cost(L) = a*L + b*L^2 on this machine.

Times forward+backward of the model on sequences of a few lengths, with the same number of tokens at
every length (so L * n_seqs is constant and the quadratic term alone makes long sequences dearer), then
fits a and b by least squares on time per sequence. Only b/a matters to the balancer; absolute seconds
are kept so a reader can check them against a step time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..batch import Batch
from ..config import ConfigError, ModelConfig
from ..data.balance import CostModel
from ..model.transformer import Transformer


def time_fwd_bwd(model: Transformer, length: int, tokens: int, repeats: int = 3) -> float:
    """Median seconds of one forward+backward over a row of tokens // length sequences of `length`."""
    n = max(1, tokens // length)
    ids = torch.randint(0, model.cfg.vocab_size, (n * length,))
    batch = Batch.from_seqlens([length] * n)
    times = []
    for _ in range(repeats + 1):  # the first run warms allocators and kernels up
        t0 = time.perf_counter()
        logits = model(ids, batch)
        F.cross_entropy(logits, ids).backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return float(np.median(times[1:])) / n


def fit(lengths: list[int], seconds_per_seq: list[float]) -> CostModel:
    """Least squares of t = a*L + b*L^2 in relative error (each length counts alike, not only the longest;
    no intercept: an empty sequence costs nothing), with a, b >= 0."""
    L = np.asarray(lengths, dtype=np.float64)
    t = np.asarray(seconds_per_seq, dtype=np.float64)
    A = np.stack([L, L * L], axis=1) / t[:, None]
    (a, b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    if b < 0:  # attention cannot make long sequences cheaper per token; noise can say so on tiny models
        a, b = float((L @ t) / (L @ L)), 0.0
    if a < 0:
        a, b = 0.0, float((L * L) @ t / ((L * L) @ (L * L)))
    return CostModel(float(a), float(b))


def calibrate(cfg: ModelConfig, lengths: list[int], tokens: int, repeats: int = 3,
              log=print) -> tuple[CostModel, list[dict]]:
    torch.manual_seed(0)
    model = Transformer(cfg)
    rows = []
    for L in lengths:
        if L > cfg.max_seq_len:
            raise ConfigError(f"calibration length {L} exceeds model.max_seq_len {cfg.max_seq_len}; pass "
                              f"--lengths up to {cfg.max_seq_len} or raise --model.max_seq_len")
        s = time_fwd_bwd(model, L, max(tokens, L), repeats)
        rows.append({"length": L, "seconds_per_seq": s, "seconds_per_token": s / L})
        log(f"  L={L:>6}: {1e3 * s:9.2f} ms per sequence, {1e6 * s / L:8.2f} us per token")
    return fit(lengths, [r["seconds_per_seq"] for r in rows]), rows


def save(path: str | Path, cost: CostModel, cfg: ModelConfig, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flops = CostModel.from_flops(cfg)
    doc = {"a": cost.a, "b": cost.b, "b_over_a": cost.b / cost.a if cost.a else None,
           "flops_b_over_a": flops.b / flops.a, "model": {k: getattr(cfg, k) for k in
           ("dim", "n_layer", "n_head", "n_kv_head", "ffn_dim", "vocab_size")}, "timings": rows,
           "torch_threads": torch.get_num_threads()}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load(path: str | Path) -> CostModel:
    """A cost model saved by `varlen bench calibrate`."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        return CostModel(float(doc["a"]), float(doc["b"]))
    except FileNotFoundError:
        raise ConfigError(f"data.cost_model {path} not found; run `varlen bench calibrate --out {path}` or "
                          f"leave data.cost_model empty for the FLOP-count model") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"data.cost_model {path} is not a cost model saved by `varlen bench calibrate`; "
                          f"run it again") from None
