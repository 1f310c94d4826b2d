"""Quality at equal wall-clock: one small model trained for the same training time with dd (grow_p2),
concat_chunk and pack; validation loss per held-out document piece for all three.

Every mode runs `python -m varlen train` as a subprocess, one after another, with identical model, data,
optimizer and seed options; only --data.batching (and, for dd, its curriculum) differs. All modes draw
the same data.tokens_per_step per optimizer step (pack fills its rows to ~99%); they differ in time per
step: concat_chunk attends causally across whole max_seq_len windows, pack attends within each
document piece, dd draws one power-of-two bucket per step (short buckets are cheap).

Validation is the same for every mode (varlen/train/loop.py `setup` builds it before and independently
of the training loader): `validation_micros` (varlen/data/loader.py) cuts the held-out documents
(a fixed split, SPLIT_SEED) into max_seq_len pieces, picks a fixed random set of them, and packs them
with `Batch.from_seqlens(piece lengths)`, so each piece attends only to itself with positions restarting
at 0, whatever --data.batching trained the model. `evaluate` runs that set through the same forward.
So a concat_chunk model is scored as it will be used, on documents without other documents' context.

Equal time, with a full learning-rate schedule for every mode. The schedule (varlen/train/schedule.py)
is warmup + cosine over train.max_steps; a bare time limit would cut the slower mode's cosine short
(its LR still high at the end), which is unfair to it. So:
  1. a pilot run per mode (--pilot-steps steps, no evaluation) measures its seconds per optimizer step
     from RUN/metrics.jsonl `time` (training steps only); step 1 is dropped (first-call costs).
     dd's step cost depends on the bucket, and a short grow_p2 pilot would see only short buckets, so
     the dd pilot runs the `cyclic` curriculum (one step of every bucket per sweep), times each bucket,
     and weights the bucket times by each bucket's share of an epoch's steps: the mix a whole grow_p2
     sweep draws.
  2. each mode's train.max_steps = round(budget / seconds per step), so its cosine ends at the budget;
     train.max_time = budget stays as the hard cap (a step that crosses it still finishes). The result
     says per mode whether the schedule or the cap ended it and how much training time it used.
  3. grow_p2 sweeps short to long once per epoch, but the budget covers a fraction of an epoch; with
     one cycle dd would spend the whole run in the short-biased start of the sweep. The script sets
     data.dd_cycles = ceil(steps per epoch / dd's planned steps), so one full short-to-long sweep fits
     in the run (the few steps after it start the next sweep). The buckets dd actually drew are reported.
warmup_steps is the preset's for every mode (identical optimizer options), not scaled per mode.
Training time excludes evaluation and checkpointing (train.max_time counts training steps only);
eval_every is chosen per mode for about --evals points per curve.
Train loss is plotted faintly only: concat_chunk's includes context from other documents and the
trivial EOD -> BOS targets at document joins, so train losses are not comparable across modes.

Modes run in sequence on one machine; load averages before and after each run are saved, since other
work on the machine changes a mode's speed. --quick (tiny model, max_seq_len 256, 30 s per mode,
1 thread) checks the script end to end; its numbers say nothing about quality. --plan-only runs the
pilots and prints each mode's planned steps (about 2 minutes at the defaults).

Read the result with these in mind (measured on the stdlib corpus, max_seq_len 2048, 8192 tokens/step):
  - The held-out split is 36 documents (~105k tokens); --eval-tokens 32768 scores 26 pieces from 19 of
    them, the same pieces for every mode and every evaluation. Small gaps between modes are within
    what another split would move; --eval-tokens 131072 scores the whole split at ~3x the eval cost.
  - Most of this corpus's tokens are in long documents: 960 of dd's 1126 steps per epoch are the
    2048 bucket, so grow_p2 is short-first only in a handful of steps and dd is mostly pack-like.
  - concat_chunk draws a step's windows in a shuffled order from the whole epoch's stream (as the usual
    baseline does), so its steps mix documents as pack's do.

    .venv/bin/python benchmarks/quality_equal_time.py             # ~23 min on 2 idle cores (estimate)
    .venv/bin/python benchmarks/quality_equal_time.py --quick --out /tmp/qet_quick
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from machine import machine_info, matrix_units
from varlen.config import load_config
from varlen.data.corpus import Corpus
from varlen.data.loader import DDLoader, make_loader
from varlen.data.tokens import prepare, split_documents
from varlen.plots import read_metrics

REPO = Path(__file__).resolve().parents[1]
MODES = ("dd", "concat_chunk", "pack")
LABELS = {"dd": "dd (grow_p2)", "concat_chunk": "concat_chunk", "pack": "pack"}
COLORS = {"dd": "tab:green", "concat_chunk": "tab:red", "pack": "tab:blue"}


# ------------------------------------------------------------------------------------------------- runs

def train_cmd(run_dir: Path, preset: str, overrides: dict[str, str]) -> list[str]:
    cmd = [sys.executable, "-m", "varlen", "train", "--out", str(run_dir), "--no-progress", "--preset", preset]
    for key, value in overrides.items():
        cmd += [f"--{key}", str(value)]
    return cmd


def run_train(cmd: list[str], run_dir: Path, threads: int) -> float:
    """Run one training subprocess (its log in RUN.log); returns its wall-clock seconds."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # our own run dir from an earlier try: varlen refuses to overwrite checkpoints
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = run_dir.with_suffix(".log")
    # Intra-op threads are set by --train.threads; these keep OpenMP/MKL pools from oversubscribing.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"training failed (exit {code}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")
    return time.perf_counter() - t0


def step_seconds(rows: list[dict]) -> np.ndarray:
    """Seconds of each logged step from the cumulative `time` (needs train.log_every 1)."""
    times = np.array([r["time"] for r in rows])
    return np.diff(np.concatenate([[0.0], times]))


# --------------------------------------------------------------------------------------------- dd plan

def dd_loader(preset: str, overrides: dict[str, str]) -> DDLoader:
    """The DD loader `varlen train` builds for these options (same config, split and seed as its setup)."""
    cfg = load_config(preset, None, overrides)
    d = cfg.data
    corpus = Corpus(d.corpus, d.glob, d.field, d.skip_bad, d.max_docs)
    _, store = prepare(corpus, cfg.model.vocab_size, d.cache_dir or None, log=lambda m: print(m, file=sys.stderr))
    train_ids, _ = split_documents(store.num_docs, d.val_fraction)
    loader = make_loader(d, cfg.model.max_seq_len, cfg.train.grad_accum, store, train_ids, cfg.train.seed)
    assert isinstance(loader, DDLoader)
    return loader


def step_buckets(loader: DDLoader, n: int) -> list[int]:
    """Bucket length of each of the loader's first n steps (epoch after epoch, as training draws them)."""
    smallest = loader.dec.lengths[0]  # dd_keep_short puts shorter chunks in it: clamp to its length
    out, epoch = [], 0
    while len(out) < n:
        out += [max(smallest, max(c.length for row in step for c in row)) for step in loader.plan_epoch(epoch)]
        epoch += 1
    return out[:n]


def cyclic_pilot_steps(loader: DDLoader, at_least: int) -> int:
    """Pilot length covering every bucket at least once after the dropped first step."""
    sweep = len(loader.dec.lengths) * 2 - 2 if len(loader.dec.lengths) > 1 else 1
    return max(at_least, sweep + 1)


def dd_seconds_per_step(dts: np.ndarray, buckets: list[int], bucket_steps: dict[int, int]) -> tuple[float, dict]:
    """Mean step time per bucket (first step dropped), weighted by each bucket's share of an epoch's steps."""
    per: dict[int, list[float]] = {}
    for dt, L in zip(dts[1:], buckets[1:]):
        per.setdefault(L, []).append(float(dt))
    total = sum(bucket_steps.values())
    missing = [L for L, n in bucket_steps.items() if n and L not in per]
    if missing:
        raise SystemExit(f"the dd pilot never drew bucket(s) {missing}; raise --pilot-steps")
    mean = {L: float(np.mean(v)) for L, v in per.items()}
    return sum(n / total * mean[L] for L, n in bucket_steps.items() if n), mean


# ----------------------------------------------------------------------------------------------- report

def curve(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """(validation points, train points) with cumulative tokens seen."""
    tokens = np.cumsum([r["tokens"] for r in rows])
    val = [{"step": r["step"], "time": r["time"], "tokens": int(t), "val_loss": r["val_loss"]}
           for r, t in zip(rows, tokens) if "val_loss" in r]
    train = [{"step": r["step"], "time": r["time"], "tokens": int(t), "loss": r["loss"]} for r, t in zip(rows, tokens)]
    return val, train


def smooth(y: list[float], window: int) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) < window:
        return y
    c = np.cumsum(np.concatenate([[0.0], y]))
    head = c[1:window] / np.arange(1, window)  # growing window at the start, so the line starts at step 1
    return np.concatenate([head, (c[window:] - c[:-window]) / window])


def plot(results: dict, entropy: float, title: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_n) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    lows = []
    for mode, r in results.items():
        val, train = r["curve"], r["train_curve"]
        lows += [p["val_loss"] for p in val]
        window = max(1, len(train) // 20)
        ax_t.plot([p["time"] for p in train], smooth([p["loss"] for p in train], window),
                  color=COLORS[mode], alpha=0.25, lw=1)
        for ax, x in ((ax_t, [p["time"] for p in val]), (ax_n, [p["tokens"] / 1e6 for p in val])):
            ax.plot(x, [p["val_loss"] for p in val], "o-", color=COLORS[mode], ms=3,
                    label=f"{LABELS[mode]}: {r['final_val_loss']:.3f} after {r['steps']} steps")
    for ax in (ax_t, ax_n):
        ax.axhline(entropy, color="gray", ls="--", lw=1, label=f"unigram entropy {entropy:.2f}")
        ax.grid(alpha=0.3)
    ax_t.set_ylim(min(lows) - 0.1, max(max(lows), entropy) + 0.3)
    ax_t.set_xlabel("training time (s; evaluation excluded)")
    ax_n.set_xlabel("tokens seen (millions)")
    ax_t.set_ylabel("validation loss, per document piece (nats/token)")
    ax_t.set_title("validation loss at equal wall-clock (faint: smoothed train loss)", fontsize=10)
    ax_n.set_title("the same points against tokens seen", fontsize=10)
    ax_n.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="model/optimizer preset in configs/ (default tiny)")
    ap.add_argument("--max-seq-len", type=int, default=2048, help="long enough that the modes' costs differ")
    ap.add_argument("--tokens-per-step", type=int, default=8192, help="a multiple of the largest dd bucket")
    ap.add_argument("--budget", type=float, default=360, help="training seconds per mode")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pilot-steps", type=int, default=8, help="timed pilot steps per mode (dd: at least a sweep)")
    ap.add_argument("--evals", type=int, default=12, help="validation points per curve (about)")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="validation target tokens per evaluation")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)}")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="extra varlen option for every mode, e.g. --set data.dd_lo=6 (repeatable)")
    ap.add_argument("--out", help="JSON + PNG directory (default benchmarks/results; --quick: /tmp/qet_quick)")
    ap.add_argument("--runs", default="/tmp/varlen_quality_equal_time", help="run directories (checkpoints)")
    ap.add_argument("--plan-only", action="store_true", help="run the pilots, print the plan, stop")
    ap.add_argument("--quick", action="store_true", help="tiny, max_seq_len 256, 30 s per mode, 1 thread")
    args = ap.parse_args()
    if args.quick:
        args.max_seq_len, args.tokens_per_step, args.budget, args.threads = 256, 2048, 30, 1
        args.pilot_steps, args.evals, args.eval_tokens = 5, 8, 4096
        args.set = ["train.warmup_steps=4"] + args.set  # the preset's 20 would be most of a 30 s run
    args.out = Path(args.out or ("/tmp/qet_quick" if args.quick else REPO / "benchmarks" / "results"))
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        raise SystemExit(f"--modes {bad or args.modes}: use a comma-separated subset of {', '.join(MODES)}")
    return args


def user_sets(args: argparse.Namespace) -> dict[str, str]:
    out = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise SystemExit(f"--set {item!r}: use SECTION.FIELD=VALUE, e.g. --set data.dd_lo=6")
        out[key.removeprefix("--")] = value
    return out


def main() -> None:
    args = parse_args()
    t_start = time.perf_counter()
    info = machine_info(args.threads, packages=())
    print(f"{info['date']}  {info['cpu']} (matrix units: {matrix_units(info)})  {info['logical_cpus']} logical CPUs, "
          f"threads {args.threads}, torch {info['torch']}", flush=True)
    extra = user_sets(args)
    shared = {"model.max_seq_len": args.max_seq_len, "data.tokens_per_step": args.tokens_per_step,
              "train.threads": args.threads, "train.eval_tokens": args.eval_tokens, "train.log_every": 1,
              "train.ckpt_every": 0, "train.keep_last": 1, **extra}
    shared = {k: str(v) for k, v in shared.items()}
    runs = Path(args.runs)

    # dd: bucket steps per epoch (pilot weights, dd_cycles) and the cyclic pilot's bucket per step.
    dd = None
    if "dd" in args.modes:
        loader = dd_loader(args.preset, {**shared, "data.batching": "dd", "data.curriculum": "cyclic"})
        n_pilot = cyclic_pilot_steps(loader, args.pilot_steps)
        dd = {"loader": loader, "pilot_steps": n_pilot, "pilot_buckets": step_buckets(loader, n_pilot),
              "bucket_steps": {L: n for L, n in loader.steps.items()}, "steps_per_epoch": sum(loader.steps.values())}

    # 1. pilots: seconds per optimizer step of each mode.
    pilots = {}
    for mode in args.modes:
        n = dd["pilot_steps"] if mode == "dd" else args.pilot_steps
        opts = {**shared, "data.batching": mode, "train.max_steps": n, "train.eval_every": 0,
                "train.eval_tokens": 1}  # the end-of-run evaluation is not timed; keep it cheap
        if mode == "dd":
            opts["data.curriculum"] = "cyclic"
        run_dir = runs / f"pilot-{mode}"
        wall = run_train(train_cmd(run_dir, args.preset, opts), run_dir, args.threads)
        dts = step_seconds(read_metrics(run_dir))
        if mode == "dd":
            sps, per_bucket = dd_seconds_per_step(dts, dd["pilot_buckets"], dd["bucket_steps"])
        else:
            sps, per_bucket = float(dts[1:].mean()), {}
        pilots[mode] = {"steps": n, "s_per_step": sps, "step_seconds": dts.round(4).tolist(),
                        "s_per_step_by_bucket": {str(L): t for L, t in sorted(per_bucket.items())}, "wall_s": wall}
        print(f"pilot {mode:13} {n:3} steps  {sps:.3f} s/step" + (
            "  (by bucket: " + ", ".join(f"{L}: {t:.2f}" for L, t in sorted(per_bucket.items())) + ")"
            if per_bucket else ""), flush=True)

    # 2. plan: each schedule ends at the budget.
    plan = {}
    for mode in args.modes:
        steps = max(1, round(args.budget / pilots[mode]["s_per_step"]))
        opts = {**shared, "data.batching": mode, "train.max_steps": steps, "train.max_time": args.budget,
                "train.eval_every": max(1, round(steps / args.evals))}
        if mode == "dd":
            opts["data.curriculum"] = extra.get("data.curriculum", "grow_p2")
            opts["data.dd_cycles"] = extra.get("data.dd_cycles", max(1, math.ceil(dd["steps_per_epoch"] / steps)))
        plan[mode] = {k: str(v) for k, v in opts.items()}
        cycles = (f", dd_cycles {opts['data.dd_cycles']} ({dd['steps_per_epoch']} steps per epoch)"
                  if mode == "dd" else "")
        print(f"plan  {mode:13} max_steps {steps}, eval_every {opts['train.eval_every']}{cycles}", flush=True)
    if args.plan_only:
        print(f"pilots took {time.perf_counter() - t_start:.0f} s; the runs need {len(args.modes)} x "
              f"{args.budget:g} s of training plus evaluation and start-up")
        return

    # 3. the equal-time runs.
    results, entropy = {}, None
    for mode in args.modes:
        run_dir = runs / mode
        cmd = train_cmd(run_dir, args.preset, plan[mode])
        load_before = os.getloadavg()
        wall = run_train(cmd, run_dir, args.threads)
        rows = read_metrics(run_dir)
        data = json.loads((run_dir / "data.json").read_text())  # documents, val_tokens, entropy, fill
        entropy = data["unigram_entropy"]
        val, train = curve(rows)
        last, planned = rows[-1], int(plan[mode]["train.max_steps"])
        r = {"command": cmd, "pilot": pilots[mode], "planned_steps": planned,
             "eval_every": int(plan[mode]["train.eval_every"]), "steps": last["step"], "tokens": val[-1]["tokens"],
             "train_time_s": last["time"], "s_per_step": last["time"] / last["step"],
             "stopped_by": "schedule" if last["step"] == planned else "max_time",
             "final_val_loss": last["val_loss"], "wall_s": wall, "data": data,
             "load_avg_before": load_before, "load_avg_after": os.getloadavg(), "curve": val,
             "train_curve": train}
        if mode == "dd":
            r["dd_cycles"] = int(plan[mode]["data.dd_cycles"])
            run_loader = dd_loader(args.preset, plan[mode])
            seen = Counter(step_buckets(run_loader, last["step"]))
            r["dd_bucket_steps_run"] = {str(L): seen[L] for L in sorted(seen)}
            print("dd drew buckets (length: steps) " + ", ".join(f"{L}: {seen[L]}" for L in sorted(seen)))
        results[mode] = r
        print(f"run   {mode:13} {last['step']} steps in {last['time']:.1f} s of training ({wall:.0f} s wall), "
              f"val loss {last['val_loss']:.4f}", flush=True)

    # 4. report.
    args.out.mkdir(parents=True, exist_ok=True)
    title = (f"{args.preset} preset, max_seq_len {args.max_seq_len}, {args.tokens_per_step} tokens/step, "
             f"{args.budget:g} s per mode, {args.threads} thread(s); stdlib corpus unless --set data.corpus")
    png, js = args.out / "loss_vs_time.png", args.out / "quality_equal_time.json"
    plot(results, entropy, title, png)
    report = {"date": info["date"], "machine": info, "command": [sys.executable, *sys.argv],
              "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "shared_varlen_options": shared, "preset": args.preset, "unigram_entropy": entropy,
              "dd_steps_per_epoch": dd["steps_per_epoch"] if dd else None,
              "dd_bucket_steps_per_epoch": {str(L): n for L, n in dd["bucket_steps"].items()} if dd else None,
              "total_wall_s": time.perf_counter() - t_start, "modes": results}
    js.write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n{'mode':14} {'steps':>9} {'tokens seen':>12} {'s/step':>7} {'(pilot)':>8} {'train s':>8} "
          f"{'val loss':>9}  stopped by")
    for mode, r in results.items():
        print(f"{LABELS[mode]:14} {r['steps']:>4}/{r['planned_steps']:<4} {r['tokens'] / 1e6:>11.3f}M "
              f"{r['s_per_step']:>7.3f} {r['pilot']['s_per_step']:>8.3f} {r['train_time_s']:>8.1f} "
              f"{r['final_val_loss']:>9.4f}  {r['stopped_by']}")
    print(f"unigram entropy of the training split: {entropy:.4f} nats/token (the best context-free model)")
    print(f"total wall-clock {report['total_wall_s']:.0f} s\nwrote {js} and {png}")


if __name__ == "__main__":
    main()
