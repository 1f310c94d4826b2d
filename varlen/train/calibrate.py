"""Measure the cost model of balancing and sequence-parallel planning on this machine.

Compute, cost(L) = a*L + b*L^2: times forward+backward of the model on sequences of a few lengths, with the
same number of tokens at every length (so L * n_seqs is constant and the quadratic term alone makes long
sequences dearer), then fits a and b by least squares on time per sequence. Only b/a matters to the
balancer; absolute seconds are kept so a reader can check them against a step time.

Communication, c (sp_plan.SPCost): times all_to_all_single between real gloo processes on this machine, as
Ulysses sequence parallelism runs it, at a few buffer sizes; the slope is seconds per byte leaving a rank,
and c is that times the bytes a token sends in a training step (sp_plan.a2a_bytes_per_token). The planner
weighs it against a and b, which are seconds too: that is why they are measured together.
"""
from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ..batch import Batch
from ..config import ConfigError, ModelConfig
from ..data.balance import CostModel
from ..data.sp_plan import SPCost, a2a_bytes_per_token
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


def time_all_to_all(ranks: int, mib: Sequence[float], repeats: int = 5) -> list[dict]:
    """One all_to_all_single between `ranks` gloo processes on this machine (talking over TCP on 127.0.0.1, as
    torchrun's ranks on one machine do), per send-buffer size in MiB: the slowest rank's median seconds."""
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "all_to_all.json"
        mp.spawn(_all_to_all_worker, args=(ranks, port, list(mib), repeats, str(out)), nprocs=ranks, join=True)
        return json.loads(out.read_text())


def _all_to_all_worker(rank: int, ranks: int, port: int, mib: list[float], repeats: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    try:
        rows = []
        for m in mib:
            n = max(ranks, int(m * 2**20) // 4 // ranks * ranks)  # float32 elements, an equal block per rank
            send, recv = torch.randn(n), torch.empty(n)
            times = []
            for _ in range(repeats + 1):  # the first call sets up the pairs' connections
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_to_all_single(recv, send)
                times.append(time.perf_counter() - t0)
            slowest = torch.tensor([float(np.median(times[1:]))], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            rows.append({"send_bytes": 4 * n, "leaving_bytes": 4 * n * (ranks - 1) // ranks,
                         "seconds": float(slowest)})
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def fit_comm(rows: list[dict]) -> tuple[float, float]:
    """(seconds per call, seconds per byte leaving a rank): least squares of t = t0 + beta * bytes, both >= 0.
    Only the slope enters c; the per-call cost is kept for a reader (a step makes 4 calls per layer)."""
    x = np.asarray([r["leaving_bytes"] for r in rows], dtype=np.float64)
    t = np.asarray([r["seconds"] for r in rows], dtype=np.float64)
    if len(rows) > 1 and np.ptp(x) > 0:
        beta, t0 = np.polyfit(x, t, 1)
        if beta > 0 and t0 >= 0:
            return float(t0), float(beta)
    return 0.0, float((x @ t) / (x @ x))  # through the origin: noise gave a negative intercept or slope


def calibrate_comm(cfg: ModelConfig, ranks: int, mib: Sequence[float], repeats: int = 5,
                   log=print) -> tuple[float, dict]:
    """c for sp_plan.SPCost (seconds per token leaving a rank in a training step), and what it came from."""
    rows = time_all_to_all(ranks, mib, repeats)
    for r in rows:
        log(f"  all_to_all_single over {ranks} ranks, {r['send_bytes'] / 2**20:6.1f} MiB per rank: "
            f"{1e3 * r['seconds']:8.2f} ms ({r['leaving_bytes'] / r['seconds'] / 1e9:.2f} GB/s leaving a rank)")
    per_call, per_byte = fit_comm(rows)
    bytes_per_token = a2a_bytes_per_token(cfg)
    return per_byte * bytes_per_token, {"ranks": ranks, "timings": rows, "seconds_per_call": per_call,
                                        "seconds_per_byte": per_byte, "bytes_per_token": bytes_per_token}


def save(path: str | Path, cost: CostModel, cfg: ModelConfig, rows: list[dict], c: float = 0.0,
         comm: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    flops = CostModel.from_flops(cfg)
    doc = {"a": cost.a, "b": cost.b, "c": c, "b_over_a": cost.b / cost.a if cost.a else None,
           "flops_b_over_a": flops.b / flops.a, "model": {k: getattr(cfg, k) for k in
           ("dim", "n_layer", "n_head", "n_kv_head", "ffn_dim", "vocab_size")}, "timings": rows,
           "comm": comm, "torch_threads": torch.get_num_threads()}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def load(path: str | Path, cfg: ModelConfig | None = None, element_bytes: int = 4) -> SPCost:
    """A cost model saved by `varlen bench calibrate`. Its c is for 4-byte elements of the model it timed; given
    the training model and its activations' element size, c is the timed seconds per byte times what that model
    sends. A file saved without an all-to-all timing gives c = 0 (communication free)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        c = float(doc.get("c") or 0.0)
        if doc.get("comm") and cfg is not None:
            c = float(doc["comm"]["seconds_per_byte"]) * a2a_bytes_per_token(cfg, element_bytes)
        return SPCost(float(doc["a"]), float(doc["b"]), c)
    except FileNotFoundError:
        raise ConfigError(f"data.cost_model {path} not found; run `varlen bench calibrate --out {path}` or "
                          f"leave data.cost_model empty for the FLOP-count model") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ConfigError(f"data.cost_model {path} is not a cost model saved by `varlen bench calibrate`; "
                          f"run it again") from None
