"""Dataset Decomposition vs concat-and-chunk: time per optimizer step next to what the cost model predicts.

Two corpora, both with the stdlib's 4096-token BPE: `stdlib` (one document per file) and `short` (the
stdlib cut into one document per top-level function or class, built once by benchmarks/short_docs.py).
For each corpus x max_seq_len x mode (varlen's `dd` and `concat_chunk` loaders, as `varlen train` builds
them: same tokens_per_step, same data.row_tokens row layout, same model) the script measures the mean
time of one optimizer step over the epoch: forward + backward of every micro-batch, grad clipping and
the AdamW step (inputs built before the clock starts; one model and optimizer for every config, after
one untimed warm-up step). Steps of all configs are timed interleaved (see time_interleaved).

How the epoch mean is measured. Every step of one DD bucket has the same shape (tokens_per_step / L
chunks of exactly L tokens, in the same rows), and so has every concat-and-chunk step (windows of
max_seq_len), so time depends on the bucket and not on which step of it runs. For DD the script times
--bucket-steps steps of every bucket that fills at least one step (the first ones of that bucket in
the seeded epoch plan) and weights each bucket's mean by its share of the epoch's steps; for
concat-and-chunk it times --concat-steps steps drawn at random (seeded) from the epoch. The same
weighting gives the epoch's attention FLOPs and the predictions, so measured and predicted describe
the same steps.

Predictions. `calibrated`: varlen.train.calibrate fits cost(L) = a*L + b*L^2 seconds of forward+backward
on this machine, in this process, at the same threads and model; a step is predicted as the sum of
cost(L) over its sequences plus the clip+AdamW time (timed once on the same model with random
gradients, the same for every config). `FLOPs`: CostModel.from_flops, forward+backward FLOPs only;
its ratios are the issue's "FLOPs predict" numbers. Attention FLOPs are causal: L(L+1)/2 query-key
pairs per sequence (flops_per_token's count). The cost model has no term for row size: calibration
rows hold --calib-tokens tokens (default 4096, the rows of the 2048 configs), while DD at 8192 runs
even its short buckets in rows of 8192, as its loader does.

Noise, shown rather than hidden: each step's wall time sits next to the CPU time other processes took
meanwhile (a warning names every config they competed with); `spread` is the widest gap between repeats
of one shape; and DD's largest bucket at max_seq_len L has exactly concat-and-chunk@L's shape (the same
sequences per row, the same rows), so the two are one workload timed twice.

Targets (from the issue): each headline ratio (DD at the largest max_seq_len over concat-and-chunk at
the smallest and at the largest) measured within 10% of the calibrated prediction; on the short
corpus, DD at the largest max_seq_len <= 1.1x concat-and-chunk at the smallest.

    .venv/bin/python benchmarks/dd_vs_concat.py                                # ~15 min, idle machine
    .venv/bin/python benchmarks/dd_vs_concat.py --quick --out /tmp/dd_quick   # tiny model, ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from machine import machine_info, matrix_units
from short_docs import build_short_docs
from varlen.config import DataConfig, ModelConfig, TrainConfig
from varlen.data.balance import CostModel
from varlen.data.corpus import Corpus
from varlen.data.loader import DDLoader, MicroBatch, StepLoader, make_loader
from varlen.data.tokens import TokenStore, default_cache_dir, prepare, split_documents
from varlen.model.transformer import Transformer, flops_per_token
from varlen.train.calibrate import calibrate
from varlen.train.loop import loss_sum
from varlen.train.optim import make_optimizer

MODES = ("dd", "concat_chunk")
# Full run (the setting) and --quick (a miniature to check the script end to end); an option
# given on the command line wins over either.
PRESETS = {
    "full": {"seq_lens": "2048,8192", "tokens_per_step": 16384, "dim": 256, "n_layer": 4, "n_head": 4,
             "n_kv_head": 2, "threads": 2, "bucket_steps": 2, "concat_steps": 2, "calib_repeats": 2,
             "calib_lengths": None},
    "quick": {"seq_lens": "256,1024", "tokens_per_step": 2048, "dim": 64, "n_layer": 2, "n_head": 2,
              "n_kv_head": 1, "threads": 1, "bucket_steps": 2, "concat_steps": 2, "calib_repeats": 2,
              "calib_lengths": "32,64,128,256,512,1024"},
}


# ------------------------------------------------------------------------------------------------ counts

def attention_flops(cfg: ModelConfig, lengths: list[int]) -> float:
    """Forward+backward FLOPs of causal attention: QK^T and AV over L(L+1)/2 query-key pairs per sequence."""
    return sum(3 * cfg.n_layer * 2 * 2 * cfg.n_head * cfg.head_dim * L * (L + 1) / 2 for L in lengths)


def model_flops(cfg: ModelConfig, lengths: list[int]) -> float:
    return sum(L * flops_per_token(cfg, L) for L in lengths)


def seqlens_of(micros: list[MicroBatch]) -> list[int]:
    """The sequences a step attends over, as the model sees them (cu_seqlens of every micro-batch).

    Read from cu_seqlens, not Batch.seqlens, which would cache what the timed forward has to compute.
    """
    return [n for m in micros for n in (m.batch.cu_seqlens[1:] - m.batch.cu_seqlens[:-1]).tolist()]


# ----------------------------------------------------------------------------------------------- corpora

@dataclass
class CorpusRun:
    name: str
    store: TokenStore
    train_ids: np.ndarray   # the training split, as `varlen train` takes it
    note: str


def length_stats(lengths: np.ndarray) -> dict:
    """Document-length percentiles, and the token-weighted median (the length the typical token sits in)."""
    p = np.percentile(lengths, [10, 50, 90, 99])
    order = np.sort(lengths)
    weighted_median = int(order[np.searchsorted(np.cumsum(order), order.sum() / 2)])
    return {"documents": int(len(lengths)), "tokens": int(lengths.sum()), "p10": float(p[0]), "p50": float(p[1]),
            "p90": float(p[2]), "p99": float(p[3]), "token_weighted_median": weighted_median}


def load_corpora(args: argparse.Namespace, cache: Path) -> list[CorpusRun]:
    tokenizer, stdlib = prepare(Corpus("stdlib"), args.vocab, cache)
    info = build_short_docs(cache / "dd_vs_concat")
    # The stdlib's tokenizer, not one trained on the new corpus: the same vocabulary for both runs.
    _, short = prepare(Corpus(str(info.path)), args.vocab, cache, tokenizer=tokenizer)
    runs = []
    for name, store, note in (("stdlib", stdlib, "one document per stdlib .py file"),
                              ("short", short, f"one document per top-level def/class of the stdlib "
                                               f"({info.skipped_files} of {info.files} files did not parse)")):
        train_ids, _ = split_documents(store.num_docs, DataConfig().val_fraction)
        runs.append(CorpusRun(name, store, train_ids, note))
    return runs


# --------------------------------------------------------------------------------------------- step plan

@dataclass
class Group:
    """Steps of one shape: a DD bucket, or all of concat-and-chunk's windows."""
    key: int                          # DD: bucket length; concat: max_seq_len
    share: float                      # of the epoch's optimizer steps
    specs: list[list]                 # the steps to time, each a list of micro-batch specs
    steps: list[list[MicroBatch]]     # the same, built (before any clock starts)


def data_config(args: argparse.Namespace, mode: str) -> DataConfig:
    return DataConfig(batching=mode, tokens_per_step=args.tokens_per_step, row_tokens=args.row_tokens)


def build(loader: StepLoader, spec: list) -> list[MicroBatch]:
    return [loader.make_batch(s) for s in spec]


def step_groups(loader: StepLoader, n_bucket: int, n_concat: int, seed: int) -> list[Group]:
    plan = loader.plan()
    if isinstance(loader, DDLoader):
        total = sum(loader.steps.values())
        firsts: dict[int, list[list]] = {}
        for step in plan:  # the plan's bucket order is the seeded curriculum's: the first k are a fair pick
            L = step[0][0].length
            if len(firsts.setdefault(L, [])) < n_bucket:
                firsts[L].append(step)
        return [Group(L, loader.steps[L] / total, firsts[L], [build(loader, s) for s in firsts[L]])
                for L in sorted(firsts)]
    pick = np.random.default_rng(seed).choice(len(plan), size=min(n_concat, len(plan)), replace=False)
    specs = [plan[i] for i in sorted(pick)]
    return [Group(loader.max_seq_len, 1.0, specs, [build(loader, s) for s in specs])]


# ------------------------------------------------------------------------------------------------ timing

def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


class Trainer:
    """One model and AdamW, stepping as varlen.train.loop.fit does: summed CE / step's targets, clip, step."""

    def __init__(self, cfg: ModelConfig, seed: int):
        torch.manual_seed(seed)
        self.model = Transformer(cfg)
        self.train_cfg = TrainConfig()
        self.optimizer = make_optimizer(self.model, self.train_cfg)

    def step(self, micros: list[MicroBatch]) -> tuple[float, float]:
        """Seconds of (forward+backward of all micro-batches, clip + AdamW + zero_grad)."""
        n_targets = sum(m.num_targets for m in micros)
        t0 = time.perf_counter()
        for m in micros:
            (loss_sum(self.model, m, nullcontext()) / n_targets).backward()
        t1 = time.perf_counter()
        self.optimizer_step()
        return t1 - t0, time.perf_counter() - t1

    def optimizer_step(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_optimizer(cfg: ModelConfig, seed: int, repeats: int = 5) -> float:
    """Median seconds of clip + AdamW + zero_grad on random gradients: the per-step constant the
    forward+backward cost model leaves out (it depends on the parameter count, not on the data)."""
    trainer, times = Trainer(cfg, seed), []
    for _ in range(repeats + 1):  # the first allocates AdamW's state
        for p in trainer.model.parameters():
            p.grad = torch.randn_like(p)
        t0 = time.perf_counter()
        trainer.optimizer_step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


@dataclass
class ConfigPlan:
    corpus: str
    seq_len: int
    mode: str
    loader: StepLoader
    groups: list[Group]


def plan_config(corpus: CorpusRun, seq_len: int, mode: str, args: argparse.Namespace) -> ConfigPlan:
    """The loader `varlen train` would build for this config, and the steps of it to time."""
    loader = make_loader(data_config(args, mode), seq_len, 1, corpus.store, corpus.train_ids, args.seed)
    return ConfigPlan(corpus.name, seq_len, mode, loader,
                      step_groups(loader, args.bucket_steps, args.concat_steps, args.seed))


@dataclass
class Timed:
    fwd_bwd: float        # seconds: forward+backward of every micro-batch of the step
    opt: float            # seconds: clip + AdamW + zero_grad
    other_cores: float    # CPU cores other processes kept busy meanwhile
    lengths: list[int]    # the step's sequences (cu_seqlens)


def time_interleaved(plans: list[ConfigPlan], trainer: Trainer) -> list[list[list[Timed]]]:
    """[config][group][step] timings. Round k runs the k-th step of every group of every config, in
    plan order on even rounds and reversed on odd ones, so a drift in machine load (other work, heat)
    spreads over all configs instead of landing on whichever ran last."""
    out: list[list[list[Timed]]] = [[[] for _ in p.groups] for p in plans]
    slots = [(i, j) for i, p in enumerate(plans) for j in range(len(p.groups))]
    rounds, t0 = max(len(g.steps) for p in plans for g in p.groups), time.perf_counter()
    for k in range(rounds):
        for i, j in (slots if k % 2 == 0 else slots[::-1]):
            if k < len(plans[i].groups[j].steps):
                micros = plans[i].groups[j].steps[k]
                busy0, own0, wall0 = cpu_busy_seconds(), time.process_time(), time.perf_counter()
                fb, opt = trainer.step(micros)
                wall = time.perf_counter() - wall0
                other = (cpu_busy_seconds() - busy0 - (time.process_time() - own0)) / wall
                out[i][j].append(Timed(fb, opt, max(0.0, other), seqlens_of(micros)))
        print(f"  round {k + 1}/{rounds} done, {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def summarize(plan: ConfigPlan, timed: list[list[Timed]], cfg: ModelConfig, cost: CostModel, opt_seconds: float,
              idle_cores: float) -> dict:
    """One config's measured and predicted step, per group and weighted by the groups' shares of the epoch."""
    flop_cost = CostModel.from_flops(cfg)
    rows = []
    for g, steps in zip(plan.groups, timed):
        fb, opt = [t.fwd_bwd for t in steps], [t.opt for t in steps]
        lengths = [t.lengths for t in steps]
        rows.append({
            "key": g.key, "share": g.share, "timed_steps": len(steps),
            "seconds": float(np.mean(fb) + np.mean(opt)), "fwd_bwd_seconds": float(np.mean(fb)),
            "opt_seconds": float(np.mean(opt)), "step_seconds": [f + o for f, o in zip(fb, opt)],
            "tokens": float(np.mean([sum(x) for x in lengths])),
            "sequences": float(np.mean([len(x) for x in lengths])),
            "micro_batches": len(g.specs[0]),
            "predicted_seconds": float(np.mean([sum(map(cost, x)) for x in lengths])) + opt_seconds,
            "predicted_flops": float(np.mean([sum(map(flop_cost, x)) for x in lengths])),
            "attention_flops": float(np.mean([attention_flops(cfg, x) for x in lengths])),
            "model_flops": float(np.mean([model_flops(cfg, x) for x in lengths])),
        })
    flat = [t for steps in timed for t in steps]
    wall = sum(t.fwd_bwd + t.opt for t in flat)
    other = sum(t.other_cores * (t.fwd_bwd + t.opt) for t in flat) / wall

    def weighted(field: str) -> float:
        return sum(r["share"] * r[field] for r in rows)

    out = {"corpus": plan.corpus, "seq_len": plan.seq_len, "mode": plan.mode,
           "steps_per_epoch": plan.loader.steps_per_epoch, "groups": rows, "timed_seconds": wall,
           # Cores other processes took beyond the ones this run left idle: > 0 means they competed with us.
           "other_cpu_cores": other, "contention_cores": max(0.0, other - idle_cores)}
    for field in ("seconds", "fwd_bwd_seconds", "opt_seconds", "tokens", "predicted_seconds", "predicted_flops",
                  "attention_flops", "model_flops"):
        out[field] = weighted(field)
    out["measured_over_predicted"] = out["seconds"] / out["predicted_seconds"]
    # Repeat noise: the widest (max - min) / mean among the config's groups, whose steps have one shape.
    out["spread"] = max((max(r["step_seconds"]) - min(r["step_seconds"])) / r["seconds"] for r in rows)
    out["attention_flop_share"] = out["attention_flops"] / out["model_flops"]
    if isinstance(plan.loader, DDLoader):
        bt = plan.loader.dec.bucket_tokens()
        out["bucket_token_share"] = {str(L): n / max(sum(bt.values()), 1) for L, n in bt.items()}
        out["dropped_tokens"] = plan.loader.dec.dropped_tokens
    return out


def predicted_timing_seconds(plans: list[ConfigPlan], cost: CostModel, opt_seconds: float) -> float:
    """What timing every planned step should take by the calibrated model."""
    return sum(sum(map(cost, seqlens_of(m))) + opt_seconds for p in plans for g in p.groups for m in g.steps)


# ------------------------------------------------------------------------------------------------ report

def headline(results: list[dict], seq_lens: list[int], tolerance: float, short_limit: float) -> list[dict]:
    """DD at the largest max_seq_len over concat-and-chunk at the smallest and the largest, per corpus."""
    lo, hi = min(seq_lens), max(seq_lens)
    by = {(r["corpus"], r["seq_len"], r["mode"]): r for r in results}
    out = []
    for corpus in dict.fromkeys(r["corpus"] for r in results):
        dd = by[(corpus, hi, "dd")]
        for base_len in dict.fromkeys((lo, hi)):
            base = by[(corpus, base_len, "concat_chunk")]
            row = {"corpus": corpus, "ratio": f"dd@{hi} / concat_chunk@{base_len}",
                   "measured": dd["seconds"] / base["seconds"],
                   "predicted": dd["predicted_seconds"] / base["predicted_seconds"],
                   "predicted_flops": dd["predicted_flops"] / base["predicted_flops"],
                   "measured_fwd_bwd": dd["fwd_bwd_seconds"] / base["fwd_bwd_seconds"]}
            row["measured_over_predicted"] = row["measured"] / row["predicted"]
            row["targets"] = [{"target": f"within {100 * tolerance:.0f}% of the cost model",
                               "met": abs(row["measured_over_predicted"] - 1) <= tolerance}]
            if corpus == "short" and base_len == lo:
                row["targets"].append({"target": f"<= {short_limit}x", "met": row["measured"] <= short_limit})
            out.append(row)
    return out


def print_table(results: list[dict]) -> None:
    head = (f"{'corpus':7} {'seq_len':>7} {'mode':13} {'steps':>6} {'measured s/step':>15} {'(fwd+bwd)':>9} "
            f"{'predicted s/step':>16} {'meas/pred':>9} {'attn FLOP%':>10} {'GFLOP/step':>10} {'spread':>6} "
            f"{'other CPU':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['corpus']:7} {r['seq_len']:>7} {r['mode']:13} {r['steps_per_epoch']:>6} {r['seconds']:>15.3f} "
              f"{r['fwd_bwd_seconds']:>9.3f} {r['predicted_seconds']:>16.3f} {r['measured_over_predicted']:>9.3f} "
              f"{100 * r['attention_flop_share']:>9.1f}% {r['model_flops'] / 1e9:>10.1f} "
              f"{100 * r['spread']:>5.1f}% {r['other_cpu_cores']:>8.2f}c")


def same_shape_checks(results: list[dict]) -> list[dict]:
    """DD's largest bucket at max_seq_len L runs exactly concat-and-chunk@L's shape (tokens_per_step / L
    sequences of L in the same rows): two independent timings of one workload, a direct noise measure."""
    by = {(r["corpus"], r["seq_len"], r["mode"]): r for r in results}
    out = []
    for (corpus, L, mode), r in by.items():
        dd_group = next((g for g in r["groups"] if g["key"] == L), None) if mode == "dd" else None
        concat = by.get((corpus, L, "concat_chunk"))
        if dd_group and concat:
            out.append({"corpus": corpus, "seq_len": L, "dd_bucket_seconds": dd_group["seconds"],
                        "concat_seconds": concat["seconds"], "ratio": dd_group["seconds"] / concat["seconds"]})
    return out


def print_groups(r: dict) -> None:
    parts = [f"{g['key']}: {100 * g['share']:.0f}% of steps, {g['micro_batches']} micro x "
             f"{g['sequences'] / g['micro_batches']:.0f} seqs, {g['seconds']:.3f}s (pred {g['predicted_seconds']:.3f}; "
             f"steps {', '.join(f'{t:.3f}' for t in g['step_seconds'])})" for g in r["groups"]]
    print(f"  {r['corpus']} {r['mode']}@{r['seq_len']}: " + "\n      ".join(parts))


def plot(results: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    corpora = list(dict.fromkeys(r["corpus"] for r in results))
    fig, axes = plt.subplots(1, len(corpora), figsize=(5.5 * len(corpora), 4.4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        rows = [r for r in results if r["corpus"] == corpus]
        xs = np.arange(len(rows))
        ax.bar(xs - 0.2, [r["seconds"] for r in rows], 0.4, label="measured")
        bars = ax.bar(xs + 0.2, [r["predicted_seconds"] for r in rows], 0.4, label="predicted (calibrated)")
        for bar, r in zip(bars, rows):
            ax.annotate(f"{r['measured_over_predicted']:.2f}x", (bar.get_x(), max(r["seconds"], bar.get_height())),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [f"{r['mode'].replace('concat_chunk', 'concat')}\n@{r['seq_len']}" for r in rows])
        ax.set_title(f"corpus {corpus}")
        ax.set_ylabel("seconds per optimizer step")
        ax.set_ylim(0, 1.3 * max(max(r["seconds"], r["predicted_seconds"]) for r in rows))
        ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(title + " (labels: measured / predicted)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, short sequences, 1 thread: a ~1 minute check")
    ap.add_argument("--seq-lens", help="comma-separated max_seq_len values (full: 2048,8192)")
    ap.add_argument("--tokens-per-step", type=int, help="a multiple of the largest DD bucket (full: 16384)")
    ap.add_argument("--row-tokens", type=int, default=DataConfig().row_tokens,
                    help="data.row_tokens: longest micro-batch row, as in training (default varlen's)")
    ap.add_argument("--bucket-steps", type=int, help="timed steps per DD bucket (full: 2)")
    ap.add_argument("--concat-steps", type=int, help="timed concat-and-chunk steps per config (full: 2)")
    ap.add_argument("--calib-lengths", help="calibration lengths (full: every other DD bucket length down "
                    "from the largest; quick: every one)")
    ap.add_argument("--calib-tokens", type=int,
                    help="tokens per calibration row (default: the smaller of --row-tokens and --tokens-per-step, "
                         "the loaders' row size; a longer L uses one row of L)")
    ap.add_argument("--calib-repeats", type=int)
    ap.add_argument("--threads", type=int, help="torch threads (full: 2, the whole machine; quick: 1)")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--n-layer", type=int)
    ap.add_argument("--n-head", type=int)
    ap.add_argument("--n-kv-head", type=int)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--attention", default="sdpa_docs", help="model.attention backend (CPU training: sdpa_docs)")
    ap.add_argument("--corpora", default="stdlib,short")
    ap.add_argument("--tolerance", type=float, default=0.10, help="target: measured ratio within this of predicted")
    ap.add_argument("--short-limit", type=float, default=1.1, help="target: short corpus dd@max / concat@min")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None, help="token store and short corpus cache (default $VARLEN_CACHE)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON and PNG")
    args = ap.parse_args()
    for k, v in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.calib_tokens is None:
        args.calib_tokens = min(args.row_tokens, args.tokens_per_step)
    return args


def main() -> None:
    args = parse_args()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    hi = max(seq_lens).bit_length() - 1
    if args.tokens_per_step % 2 ** hi:
        raise SystemExit(f"--tokens-per-step {args.tokens_per_step} must be a multiple of the largest DD bucket "
                         f"{2 ** hi}, so every step holds the same tokens")
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "dd_vs_concat_quick" if args.quick else "dd_vs_concat"
    command = " ".join([os.path.relpath(sys.executable)] + sys.argv)
    t_start, cpu_start = time.perf_counter(), time.process_time()

    info = machine_info(args.threads, packages=())
    print(f"command: {command}")
    print(f"date {info['date']} | CPU {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB) | "
          f"matrix units: {matrix_units(info)} | torch {info['torch']}, python {info['python']} | "
          f"{args.threads} threads | "
          f"load avg {os.getloadavg()[0]:.2f}")
    corpora = [c for c in load_corpora(args, cache) if c.name in args.corpora.split(",")]
    corpus_stats = {}
    for c in corpora:
        s = corpus_stats[c.name] = length_stats(c.store.lengths[c.train_ids])
        print(f"corpus {c.name} ({c.note}), training split: {s['documents']:,} documents, {s['tokens']:,} tokens; "
              f"document length p10/p50/p90/p99 {s['p10']:.0f}/{s['p50']:.0f}/{s['p90']:.0f}/{s['p99']:.0f}, "
              f"token-weighted median {s['token_weighted_median']}")

    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                      n_kv_head=args.n_kv_head, max_seq_len=max(seq_lens), attention=args.attention)
    # Default: every other bucket length down from the largest (the fit needs the long ones most).
    lengths = ([int(x) for x in args.calib_lengths.split(",")] if args.calib_lengths else
               [2 ** i for i in range(hi, DataConfig().dd_lo - 1, -2)][::-1])
    print(f"model: dim {cfg.dim}, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} kv), ffn {cfg.ffn_dim}, "
          f"vocab {cfg.vocab_size}, {Transformer(cfg).num_params() / 1e6:.2f}M parameters, attention {cfg.attention}")
    print(f"calibrating forward+backward at L = {lengths} (rows of {args.calib_tokens} tokens, median of "
          f"{args.calib_repeats}):", flush=True)
    cost, calib_rows = calibrate(cfg, lengths, args.calib_tokens, args.calib_repeats)
    opt_seconds = time_optimizer(cfg, args.seed)
    flops = CostModel.from_flops(cfg)
    fit_error = max(abs(cost(r["length"]) / r["seconds_per_seq"] - 1) for r in calib_rows)
    print(f"calibrated cost(L) = {cost.a:.3e} L + {cost.b:.3e} L^2 s (b/a {cost.b / cost.a:.2e}, worst fit error "
          f"{100 * fit_error:.1f}%; FLOP model b/a {flops.b / flops.a:.2e}); clip+AdamW {opt_seconds:.3f} s per step",
          flush=True)

    plans = [plan_config(c, seq_len, mode, args) for c in corpora for seq_len in seq_lens for mode in MODES]
    expected = predicted_timing_seconds(plans, cost, opt_seconds)
    print(f"\ntiming: {args.tokens_per_step} tokens per step, rows of <= max({args.row_tokens}, max_seq_len) tokens; "
          f"DD: {args.bucket_steps} steps per bucket; concat: {args.concat_steps} random steps; one model and "
          f"AdamW for all, after one untimed warm-up step; the cost model expects {expected / 60:.1f} min of timing",
          flush=True)
    # One trainer for every config: the model's shape is the same, and its weights do not change the work.
    trainer = Trainer(cfg, args.seed)
    longest = max(plans, key=lambda p: p.seq_len)
    # First calls and AdamW's state, on a fresh copy of a step (a timed Batch must not arrive with cached plans).
    trainer.step(build(longest.loader, longest.groups[-1].specs[0]))
    timed = time_interleaved(plans, trainer)
    idle_cores = max(0, (info["logical_cpus"] or 1) - args.threads)
    results = [summarize(p, t, cfg, cost, opt_seconds, idle_cores) for p, t in zip(plans, timed)]
    for r in results:
        print_groups(r)
        print(f"    -> {r['seconds']:.3f} s/step over the epoch ({r['timed_seconds']:.0f}s timed, other "
              f"processes {r['other_cpu_cores']:.2f} cores)")

    print()
    print_table(results)
    for r in results:
        if "bucket_token_share" in r and r["seq_len"] == max(seq_lens):
            shares = ", ".join(f"{L}: {100 * s:.0f}%" for L, s in r["bucket_token_share"].items())
            print(f"{r['corpus']} DD@{r['seq_len']} tokens per bucket: {shares}; {r['dropped_tokens']:,} tokens "
                  f"dropped (chunks < 2^{DataConfig().dd_lo})")
    busy = [f"{r['corpus']} {r['mode']}@{r['seq_len']}" for r in results if r["contention_cores"] > 0.2]
    if busy:
        print(f"WARNING: other processes used > 0.2 of the cores this run needed while timing {', '.join(busy)}: "
              f"those times are inflated")

    checks = same_shape_checks(results)
    print("same shape, timed twice (DD's largest bucket vs concat-and-chunk at that max_seq_len): " + "; ".join(
        f"{c['corpus']}@{c['seq_len']} {c['dd_bucket_seconds']:.3f} vs {c['concat_seconds']:.3f} s "
        f"({100 * (c['ratio'] - 1):+.1f}%)" for c in checks))
    ratios = headline(results, seq_lens, args.tolerance, args.short_limit)
    print(f"\n{'corpus':7} {'ratio':28} {'measured':>8} {'predicted':>9} {'meas/pred':>9} {'FLOPs':>6} "
          f"{'fwd+bwd only':>12}  targets")
    for h in ratios:
        verdicts = "; ".join(f"{t['target']}: {'met' if t['met'] else 'MISSED'}" for t in h["targets"])
        print(f"{h['corpus']:7} {h['ratio']:28} {h['measured']:>8.3f} {h['predicted']:>9.3f} "
              f"{h['measured_over_predicted']:>9.3f} {h['predicted_flops']:>6.3f} {h['measured_fwd_bwd']:>12.3f}  "
              f"{verdicts}")

    elapsed, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    print(f"\nran {elapsed:.0f}s wall, {cpu:.0f}s CPU")
    report = {"command": command, "machine": info, "args": vars(args), "model": asdict(cfg),
              "corpora": corpus_stats,
              "calibration": {"a": cost.a, "b": cost.b, "rows": calib_rows, "worst_fit_error": fit_error,
                              "opt_seconds": opt_seconds, "flops_a": flops.a, "flops_b": flops.b},
              "expected_timing_seconds": expected,
              "results": results, "same_shape_checks": checks, "headline": ratios, "wall_seconds": elapsed,
              "cpu_seconds": cpu}
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, f"DD vs concat-and-chunk, {args.tokens_per_step} tokens/step, {args.threads} thread(s), "
                  f"{info['date'][:10]}", out / f"{stem}.png")
    print(f"wrote {out / f'{stem}.json'} and {out / f'{stem}.png'}")


if __name__ == "__main__":
    main()
