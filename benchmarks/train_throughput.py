"""Training throughput: varlen's packed rows against Hugging Face Llama fed padded or packed batches.

One run, on the stdlib corpus (4096-token BPE), one model config, the same sampled pieces (documents cut
to max_seq_len) and the same useful tokens per optimizer step for every method:

  varlen        varlen Transformer on packed rows (pack_epoch), default CPU attention (sdpa_docs)
  hf_padded     LlamaForCausalLM (sdpa), B pieces per batch in sampled (random) order, right-padded
  hf_grouped    the same, batches grouped by length as Trainer's group_by_length does
  hf_packed     LlamaForCausalLM (sdpa), padding-free: rows (1, T) with position_ids restarting per piece

Every (method, seq_len) runs in a fresh process so its peak RSS is its own. Timing covers forward,
backward, grad clipping and the AdamW step; batches are built before the clock starts.

    VARLEN_CACHE=/tmp/vcache .venv/bin/python benchmarks/train_throughput.py
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from varlen.batch import Batch
from varlen.config import ModelConfig, TrainConfig
from varlen.data.corpus import Corpus
from varlen.data.loader import make_micro
from varlen.data.pack import Piece, best_fit_decreasing, cut_pieces, materialize, pack_epoch
from varlen.data.tokens import TokenStore, prepare
from varlen.model.transformer import Transformer, flops_per_token
from varlen.train.loop import loss_sum
from varlen.train.optim import make_optimizer

METHODS = ("varlen", "hf_padded", "hf_grouped", "hf_packed")
LABELS = {
    "varlen": "varlen packed (sdpa_docs)",
    "hf_padded": "HF padded, random order (i)",
    "hf_grouped": "HF padded, group_by_length (ii)",
    "hf_packed": "HF packed position_ids (iii)",
}
IGNORE = -100

Step = list[list[Piece]]  # one optimizer step: micro-batches, each a list of pieces


# ----------------------------------------------------------------------------------------------- workload

@dataclass
class Workload:
    """Everything one seq_len's runs share: the model config, the capacity and each method's steps."""
    seq_len: int
    batch: int                  # B pieces per padded batch
    capacity: int               # varlen row capacity (tokens per optimizer step)
    row_capacity: int           # tokens per HF padding-free row
    cfg: ModelConfig
    steps: dict[str, list[Step]]
    warmup: dict[str, list[Step]]
    check_row: list[Piece]      # several short pieces, to test HF's packed path before timing it


def sample_pieces(store: TokenStore, seq_len: int, n: int, seed: int) -> list[Piece]:
    """n pieces drawn uniformly (seeded) from all pieces of the corpus, so both length tails show up."""
    pieces = cut_pieces(range(store.num_docs), store.lengths, seq_len)
    if n > len(pieces):
        raise SystemExit(f"asked for {n} pieces at seq_len {seq_len} but the corpus has {len(pieces)}")
    order = np.random.default_rng(seed).permutation(len(pieces))[:n]
    return [pieces[i] for i in order]


def padded_batches(pieces: list[Piece], batch: int) -> list[Step]:
    """(i): consecutive pieces in sampled order, B per batch, as a shuffled DataLoader would give them."""
    return [[pieces[i:i + batch]] for i in range(0, len(pieces), batch)]


def grouped_batches(pieces: list[Piece], batch: int, seed: int) -> list[Step]:
    """(ii): Trainer's LengthGroupedSampler sorts megabatches of 50*B by length, longest first.

    A pool of fewer than 50*B pieces is one megabatch, so it is sorted whole; the batch order is
    then shuffled so a step's length does not depend on its index.
    """
    megabatch = 50 * batch
    ordered: list[Piece] = []
    for i in range(0, len(pieces), megabatch):
        ordered += sorted(pieces[i:i + megabatch], key=lambda p: -p.length)  # stable: ties keep sample order
    batches = padded_batches(ordered, batch)
    return [batches[i] for i in np.random.default_rng(seed).permutation(len(batches))]


def fitting_capacity(pieces: list[Piece], n_rows: int, seq_len: int) -> int:
    """Smallest capacity (multiple of 64) at which best-fit packs the pieces into at most n_rows rows.

    Starts from the mean useful tokens of a padded batch, so a varlen step holds what a padded step does.
    """
    lengths = [p.length for p in pieces]
    capacity = max(seq_len, math.ceil(sum(lengths) / n_rows / 64) * 64)
    while len(best_fit_decreasing(lengths, capacity)) > n_rows:
        capacity += 64
    return capacity


def packed_subrows(row: list[Piece], row_capacity: int) -> Step:
    """(iii): one varlen step split into padding-free rows of at most row_capacity tokens (grad accumulation)."""
    lengths = [p.length for p in row]
    return [[row[i] for i in b] for b in best_fit_decreasing(lengths, row_capacity)]


def build_workload(store: TokenStore, cfg: ModelConfig, seq_len: int, batch: int, n_steps: int,
                   warmup_pieces: int, packed_row_capacity: int, seed: int) -> Workload:
    pieces = sample_pieces(store, seq_len, n_steps * batch + warmup_pieces, seed)
    timed, warm = pieces[:n_steps * batch], pieces[n_steps * batch:]
    capacity = fitting_capacity(timed, n_steps, seq_len)
    rows = pack_epoch(timed, capacity, seed)
    warm_rows = pack_epoch(warm, capacity, seed)
    row_cap = packed_row_capacity or seq_len
    steps = {
        "varlen": [[r] for r in rows],
        "hf_padded": padded_batches(timed, batch),
        "hf_grouped": grouped_batches(timed, batch, seed),
        "hf_packed": [packed_subrows(r, row_cap) for r in rows],
    }
    warmup = {
        "varlen": [[r] for r in warm_rows],
        "hf_padded": padded_batches(warm, batch),
        "hf_grouped": grouped_batches(warm, batch, seed),
        "hf_packed": [packed_subrows(r, row_cap) for r in warm_rows],
    }
    return Workload(seq_len, batch, capacity, row_cap, cfg, steps, warmup, shortest_row(timed, row_cap))


def shortest_row(pieces: list[Piece], capacity: int, max_pieces: int = 8) -> list[Piece]:
    """The shortest pieces that fit one row together: many document boundaries in few tokens."""
    row: list[Piece] = []
    for p in sorted(pieces, key=lambda p: p.length):
        if len(row) == max_pieces or sum(q.length for q in row) + p.length > capacity:
            break
        row.append(p)
    return row


# ------------------------------------------------------------------------------------------------- FLOPs

def useful_flops(cfg: ModelConfig, lengths: list[int]) -> float:
    """Forward+backward FLOPs of the real tokens: each piece causal over its own length only."""
    return sum(n * flops_per_token(cfg, n) for n in lengths)


def step_flops(cfg: ModelConfig, method: str, step: Step) -> float:
    """FLOPs the method's batch shape asks for, counting attention as causal (the ideal kernel).

    Padded batches compute B x L tokens at length L; packed rows compute only their pieces.
    """
    if method in ("hf_padded", "hf_grouped"):
        return sum(len(mb) * L * flops_per_token(cfg, L) for mb in step for L in [max(p.length for p in mb)])
    return useful_flops(cfg, [p.length for mb in step for p in mb])


def shape_stats(cfg: ModelConfig, method: str, steps: list[Step]) -> dict:
    lengths = [p.length for s in steps for mb in s for p in mb]
    computed = sum(len(mb) * max(p.length for p in mb) for s in steps for mb in s) \
        if method in ("hf_padded", "hf_grouped") else sum(lengths)
    uf = useful_flops(cfg, lengths)
    cf = sum(step_flops(cfg, method, s) for s in steps)
    return {"steps": len(steps), "micro_batches": sum(len(s) for s in steps), "pieces": len(lengths),
            "useful_tokens": sum(lengths), "computed_tokens": computed, "useful_token_share": sum(lengths) / computed,
            "useful_flops": uf, "computed_flops": cf, "padding_flop_share": 1 - uf / cf}


# ------------------------------------------------------------------------------------------------ models

def hf_llama_from(model: Transformer):
    """LlamaForCausalLM (sdpa) of the same sizes, holding a copy of varlen's weights (names match HF's)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.cfg
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                     num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                     head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                     rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                     tie_word_embeddings=c.tie_embeddings, use_cache=False)
    hf = LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    state["lm_head.weight"] = model.output_weight().detach()
    hf.load_state_dict(state, strict=True)
    if c.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "HF did not tie embeddings"
    return hf.train()


@dataclass
class HFInputs:
    kwargs: dict           # for LlamaForCausalLM.forward, loss via HF's own ForCausalLMLoss
    n_targets: int


def hf_padded_inputs(store: TokenStore, pieces: list[Piece]) -> HFInputs:
    """Right-padded (B, L) batch; labels are already the next tokens, -100 on pads."""
    L = max(p.length for p in pieces)
    ids = torch.zeros(len(pieces), L, dtype=torch.long)
    labels = torch.full((len(pieces), L), IGNORE, dtype=torch.long)
    for i, p in enumerate(pieces):
        x, y, _ = materialize([p], store.doc)
        ids[i, :p.length], labels[i, :p.length] = torch.from_numpy(x), torch.from_numpy(y)
    mask = (labels != IGNORE).long()
    return HFInputs({"input_ids": ids, "attention_mask": mask, "labels": labels, "shift_labels": labels},
                    int(mask.sum()))


def hf_packed_inputs(store: TokenStore, pieces: list[Piece]) -> HFInputs:
    """One (1, T) row, no attention_mask, position_ids restarting at 0 per piece (HF's padding-free path)."""
    x, y, seqlens = materialize(pieces, store.doc)
    labels = torch.from_numpy(y)[None]
    positions = Batch.from_seqlens(seqlens).positions[None]
    return HFInputs({"input_ids": torch.from_numpy(x)[None], "position_ids": positions, "labels": labels,
                     "shift_labels": labels}, int(labels.numel()))


# ------------------------------------------------------------------------------------------------ checks

def max_diff_packed_vs_per_doc(hf, store: TokenStore, row: list[Piece]) -> dict:
    """HF logits of a packed row against the same pieces run one by one; a naive row shows the check bites."""
    with torch.no_grad():
        packed = hf_packed_inputs(store, row).kwargs
        logits = hf(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        per_doc = torch.cat([hf(input_ids=hf_packed_inputs(store, [p]).kwargs["input_ids"]).logits[0] for p in row])
        naive = hf(input_ids=packed["input_ids"]).logits[0]  # positions 0..T-1, one causal sequence
    return {"pieces": len(row), "tokens": int(logits.shape[0]),
            "max_abs_diff": float((logits - per_doc).abs().max()),
            "max_abs_diff_without_position_ids": float((naive - per_doc).abs().max())}


def max_diff_varlen_vs_hf_padded(model: Transformer, hf, store: TokenStore, pieces: list[Piece]) -> float:
    """The copied weights give the same logits: varlen packed vs HF padded, on real tokens only."""
    with torch.no_grad():
        micro = make_micro(store, pieces)
        ours = model(micro.ids, micro.batch)
        inp = hf_padded_inputs(store, pieces).kwargs
        theirs = hf(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        theirs = theirs[inp["attention_mask"].bool()]  # row-major = piece order = varlen's stream order
    return float((ours - theirs).abs().max())


# ------------------------------------------------------------------------------------------------ worker

def cpu_busy_seconds() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def run_method(method: str, work: Workload, threads: int, seed: int, cache_dir: str | None) -> dict:
    """Runs in its own process: build model + inputs, warm up, time the steps, report."""
    torch.set_num_threads(threads)
    _, store = prepare(Corpus("stdlib"), work.cfg.vocab_size, cache_dir, log=lambda _: None)
    torch.manual_seed(seed)
    model = Transformer(work.cfg)
    result: dict = {"method": method, "seq_len": work.seq_len}

    if method == "varlen":
        net = model

        def build(step: Step) -> list:
            return [make_micro(store, mb) for mb in step]

        def loss_of(micro, n_targets: int) -> torch.Tensor:
            return loss_sum(model, micro, nullcontext()) / n_targets

        def targets_of(micro) -> int:
            return micro.num_targets
    else:
        net = hf_llama_from(model)
        collate = hf_packed_inputs if method == "hf_packed" else hf_padded_inputs
        if method == "hf_packed":
            # Before timing: does sdpa honour the restarting position_ids, or attend across documents?
            check = max_diff_packed_vs_per_doc(net, store, work.check_row)
            check["valid"] = len(work.check_row) > 1 and check["max_abs_diff"] < 1e-3
            result["packed_check"] = check
        if method == "hf_padded":
            result["weights_check_max_abs_diff"] = max_diff_varlen_vs_hf_padded(model, net, store, work.check_row)
        del model

        def build(step: Step) -> list:
            return [collate(store, mb) for mb in step]

        def loss_of(inp: HFInputs, n_targets: int) -> torch.Tensor:
            return net(**inp.kwargs, num_items_in_batch=n_targets, use_cache=False).loss

        def targets_of(inp: HFInputs) -> int:
            return inp.n_targets

    optimizer = make_optimizer(net, TrainConfig())
    clip = TrainConfig().grad_clip

    def train_step(micros: list) -> None:
        """As varlen.train.loop.fit: sum CE / step's targets over micro-batches, clip, AdamW step."""
        n_targets = sum(targets_of(m) for m in micros)
        for m in micros:
            loss_of(m, n_targets).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed = [build(s) for s in work.steps[method]]
    rss_base = psutil.Process().memory_info().rss
    for step in work.warmup[method]:  # first calls, optimizer state allocation
        train_step(build(step))

    load_before = os.getloadavg()[0]
    busy0, own0 = cpu_busy_seconds(), time.process_time()
    times = []
    for micros in timed:
        t0 = time.perf_counter()
        train_step(micros)
        times.append(time.perf_counter() - t0)
    busy, own = cpu_busy_seconds() - busy0, time.process_time() - own0
    wall = sum(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    result.update({
        "step_seconds": times, "seconds": wall, "peak_rss_bytes": peak, "rss_before_training_bytes": rss_base,
        "load_avg_1min_before": load_before,
        # CPU seconds other processes used per wall second while we were timing (0 = machine was ours).
        "other_cpu_cores": max(0.0, (busy - own) / wall),
    })
    return result


def run_isolated(method: str, work: Workload, args: argparse.Namespace) -> dict:
    """A fresh spawned process per run: peak RSS is that run's own and no allocator state carries over."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(run_method, (method, work, args.threads, args.seed, args.cache_dir))


# ------------------------------------------------------------------------------------------------ machine

def matmul_flops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """Dense fp32 matmul FLOP/s with the benchmark's thread count: the machine's practical peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int) -> dict:
    import transformers
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "threads": threads, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------ report

def summarize(work: Workload, runs: dict[str, dict]) -> dict:
    rows = {}
    for method, r in runs.items():
        stats = shape_stats(work.cfg, method, work.steps[method])
        tok_s = stats["useful_tokens"] / r["seconds"]
        rows[method] = {**stats, **r, "useful_tokens_per_s": tok_s,
                        "useful_flops_per_s": stats["useful_flops"] / r["seconds"]}
    base = rows["varlen"]["useful_tokens_per_s"]
    for method, row in rows.items():
        row["varlen_speedup"] = base / row["useful_tokens_per_s"]
    return rows


def fmt_bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f}G"


def print_table(seq_len: int, work: Workload, rows: dict[str, dict]) -> None:
    print(f"\n=== max_seq_len {seq_len}: B={work.batch} pieces per padded batch, varlen rows of "
          f"{work.capacity} tokens, {rows['varlen']['useful_tokens']:,} useful tokens in "
          f"{rows['varlen']['steps']} steps ===")
    head = (f"{'method':34} {'steps':>5} {'useful%':>7} {'pad FLOP%':>9} {'time s':>7} {'useful tok/s':>12} "
            f"{'varlen x':>8} {'MFU':>6} {'peak RSS':>8} {'+RSS':>7} {'other CPU':>9}")
    print(head)
    print("-" * len(head))
    for method, r in rows.items():
        name = LABELS[method] + (" INVALID" if not r.get("packed_check", {}).get("valid", True) else "")
        print(f"{name:34} {r['steps']:>5} {100 * r['useful_token_share']:>6.1f}% "
              f"{100 * r['padding_flop_share']:>8.1f}% {r['seconds']:>7.1f} {r['useful_tokens_per_s']:>12,.0f} "
              f"{r['varlen_speedup']:>7.2f}x {100 * r['mfu']:>5.1f}% {fmt_bytes(r['peak_rss_bytes']):>8} "
              f"{fmt_bytes(r['peak_rss_bytes'] - r['rss_before_training_bytes']):>7} "
              f"{r['other_cpu_cores']:>8.2f}c")
    busy = [m for m, r in rows.items() if r["other_cpu_cores"] > 0.2]
    if busy:
        print(f"WARNING: other processes used > 0.2 cores while timing {', '.join(busy)}; those numbers are low")


def print_checks(rows: dict[str, dict]) -> None:
    if "hf_padded" in rows:
        print(f"weights copy check: varlen vs HF padded logits, max abs diff "
              f"{rows['hf_padded']['weights_check_max_abs_diff']:.2e}")
    if "hf_packed" in rows:
        c = rows["hf_packed"]["packed_check"]
        verdict = "documents separated" if c["valid"] else "INVALID: cross-document attention"
        print(f"HF packed check (row of {c['pieces']} pieces, {c['tokens']} tokens): max abs diff vs per-document "
              f"runs {c['max_abs_diff']:.2e} (without position_ids {c['max_abs_diff_without_position_ids']:.2e}) "
              f"-> {verdict}")


def targets(results: dict[int, dict[str, dict]]) -> list[dict]:
    """The issue's targets, evaluated per seq_len."""
    out = []
    for seq_len, rows in results.items():
        if "hf_padded" in rows:
            p = rows["hf_padded"]
            ideal = p["computed_flops"] / p["useful_flops"]
            reached = p["varlen_speedup"] / ideal
            out.append({"seq_len": seq_len, "target": "speed-up over (i) >= 90% of ideal",
                        "value": f"{p['varlen_speedup']:.2f}x of ideal {ideal:.2f}x = {100 * reached:.0f}%",
                        "pass": reached >= 0.9})
        if "hf_grouped" in rows:
            s = rows["hf_grouped"]["varlen_speedup"]
            out.append({"seq_len": seq_len, "target": "speed-up over (ii) >= 1.0x",
                        "value": f"{s:.2f}x", "pass": s >= 1.0})
        if "hf_packed" in rows and seq_len >= 8192:
            s = rows["hf_packed"]["varlen_speedup"]
            out.append({"seq_len": seq_len, "target": "speed-up over (iii) >= 2x at 8192",
                        "value": f"{s:.2f}x", "pass": s >= 2.0})
    return out


def plot(results: dict[int, dict[str, dict]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seq_lens = list(results)
    methods = [m for m in METHODS if any(m in results[s] for s in seq_lens)]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(seq_lens))]
        ys = [results[s][m]["useful_tokens_per_s"] if m in results[s] else 0 for s in seq_lens]
        invalid = any(not results[s].get(m, {}).get("packed_check", {}).get("valid", True) for s in seq_lens)
        bars = ax.bar(xs, ys, width, label=LABELS[m] + (" INVALID" if invalid else ""), hatch="//" if invalid else None)
        for b, s in zip(bars, seq_lens):
            if m in results[s] and m != "varlen":
                ax.annotate(f"{results[s][m]['varlen_speedup']:.2f}x", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(seq_lens)), [f"max_seq_len {s}" for s in seq_lens])
    ax.set_ylabel("useful (non-pad) tokens / s")
    ax.set_title("Training throughput, stdlib corpus (labels: varlen speed-up over that method)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="2048,8192", help="comma-separated max_seq_len values")
    ap.add_argument("--steps", default="3,2", help="timed optimizer steps: one value, or one per seq len")
    ap.add_argument("--batch", type=int, default=16, help="pieces per padded batch (B)")
    ap.add_argument("--warmup-pieces", type=int, default=4,
                    help="pieces (not in the timed set) run as untimed warm-up steps by every method")
    ap.add_argument("--packed-row-capacity", type=int, default=0,
                    help="tokens per HF padding-free row (0 = max_seq_len); HF builds a dense T x T mask per row")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="token store cache (default $VARLEN_CACHE)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON and PNG")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    steps = steps * len(seq_lens) if len(steps) == 1 else steps
    if len(steps) != len(seq_lens):
        raise SystemExit("--steps takes one value or one per --seq-lens entry")
    methods = [m for m in args.methods.split(",") if m]
    if "varlen" not in methods or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods must include varlen and be drawn from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = machine_info(args.threads)
    tokenizer, store = prepare(Corpus("stdlib"), args.vocab, args.cache_dir)
    peak_before = matmul_flops(args.threads)
    print(f"date {info['date']} | CPU {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB) | "
          f"torch {info['torch']}, transformers {info['transformers']}, python {info['python']} | "
          f"{args.threads} threads")
    print(f"corpus stdlib: {store.num_docs:,} documents, {store.num_tokens:,} tokens, BPE vocab {tokenizer.vocab_size}")
    print(f"timing: forward+backward+clip+AdamW per optimizer step; per seq len {dict(zip(seq_lens, steps))} timed "
          f"steps after untimed warm-up on {args.warmup_pieces} other pieces; each (method, seq_len) in a fresh "
          f"process; inputs built before the clock starts; fp32")
    print(f"dense fp32 matmul 2048x2048, {args.threads} threads: {peak_before / 1e9:.1f} GFLOP/s")

    results: dict[int, dict[str, dict]] = {}
    workloads: dict[int, Workload] = {}
    for seq_len, n_steps in zip(seq_lens, steps):
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                          n_kv_head=args.n_kv_head, max_seq_len=seq_len, attention="sdpa_docs")
        work = build_workload(store, cfg, seq_len, args.batch, n_steps, args.warmup_pieces,
                              args.packed_row_capacity, args.seed)
        workloads[seq_len] = work
        runs = {}
        for method in methods:
            t0 = time.perf_counter()
            runs[method] = run_isolated(method, work, args)
            print(f"  [{seq_len}] {method}: {runs[method]['seconds']:.1f}s timed, {time.perf_counter() - t0:.0f}s "
                  f"with setup, load avg before {runs[method]['load_avg_1min_before']:.2f}", flush=True)
        results[seq_len] = summarize(work, runs)

    peak_after = matmul_flops(args.threads)
    peak = max(peak_before, peak_after)
    for rows in results.values():  # MFU against the better of the two matmul measurements
        for r in rows.values():
            r["mfu"] = r["useful_flops_per_s"] / peak
    print(f"\ndense fp32 matmul again after the runs: {peak_after / 1e9:.1f} GFLOP/s; MFU below uses "
          f"{peak / 1e9:.1f} GFLOP/s")
    cfg0 = next(iter(workloads.values())).cfg
    print(f"model: dim {cfg0.dim}, {cfg0.n_layer} layers, {cfg0.n_head} heads ({cfg0.n_kv_head} kv), ffn {cfg0.ffn_dim}, "
          f"vocab {cfg0.vocab_size}, tied embeddings {cfg0.tie_embeddings}, "
          f"{Transformer(cfg0).num_params() / 1e6:.2f}M parameters")
    print("columns: useful% = non-pad share of computed tokens; pad FLOP% = share of FLOPs (causal attention "
          "counted per sequence) spent on padding; MFU = useful FLOP/s / matmul FLOP/s; +RSS = peak RSS minus RSS "
          "after setup; other CPU = cores used by other processes while timing")
    for seq_len, rows in results.items():
        print_table(seq_len, workloads[seq_len], rows)
        print_checks(rows)

    print("\ntargets:")
    verdicts = targets(results)
    for t in verdicts:
        print(f"  [{t['seq_len']}] {t['target']:38} {t['value']:32} {'PASS' if t['pass'] else 'FAIL'}")

    report = {"machine": info, "args": vars(args), "matmul_flops": {"before": peak_before, "after": peak_after},
              "model": asdict(cfg0), "targets": verdicts,
              "results": {str(s): {"capacity": workloads[s].capacity, "batch": workloads[s].batch, "methods": rows}
                          for s, rows in results.items()}}
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "train_throughput.png")
    print(f"\nwrote {out / 'train_throughput.json'} and {out / 'train_throughput.png'}")


if __name__ == "__main__":
    main()
