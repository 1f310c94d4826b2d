"""Does bf16 autocast train like fp32? Loss curves of one preset in both dtypes over several seeds: the
bf16-fp32 difference is judged against the spread the seeds alone give.

Each (dtype, seed) is a real `varlen train` run (the preset, `--train.dtype D --train.seed S`), --parallel at a
time with the cores split between them (loss does not depend on timing). Reported at each evaluation: every
run's val_loss, the spread (max - min) over seeds within each dtype, and the difference of the dtype means;
"within the seed spread" means |mean bf16 - mean fp32| <= the larger of the two dtypes' spreads. Plus the
train loss (mean of the last 20 steps) the same way, and a plot of all curves.

    .venv/bin/python benchmarks/dtype_loss.py                        # tiny preset, seeds 1337 and 1, 200 steps
    .venv/bin/python benchmarks/dtype_loss.py --steps 100 --seeds 1337,1,2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from machine import machine_info

DTYPES = ("float32", "bfloat16")


def run_all(args, runs: list[tuple[str, int]]) -> None:
    threads = max(1, (os.cpu_count() or 1) // args.parallel)
    pending, active = list(runs), []
    while pending or active:
        while pending and len(active) < args.parallel:
            dtype, seed = pending.pop(0)
            out = run_dir(args, dtype, seed)
            if (out / "metrics.jsonl").is_file() and not args.rerun and _done(out, args.steps):
                print(f"{out}: done already, reused")
                continue
            cmd = [sys.executable, "-m", "varlen", "train", "--preset", args.preset, "--out", str(out),
                   "--no-progress", "--train.dtype", dtype, "--train.seed", str(seed),
                   "--train.max_steps", str(args.steps), "--train.threads", str(threads), *args.extra.split()]
            if out.exists():
                subprocess.run(["rm", "-rf", str(out)], check=True)
            print("$ " + " ".join(cmd), flush=True)
            log = open(out.parent / f"{out.name}.log", "w")
            active.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), out, time.time()))
        for proc, out, t0 in list(active):
            if proc.poll() is not None:
                active.remove((proc, out, t0))
                if proc.returncode:
                    raise SystemExit(f"{out} failed (exit {proc.returncode}); see {out}.log")
                print(f"{out}: {time.time() - t0:.0f} s", flush=True)
        time.sleep(1)


def _done(out: Path, steps: int) -> bool:
    rows = read(out)
    return bool(rows) and rows[-1]["step"] == steps


def run_dir(args, dtype: str, seed: int) -> Path:
    return Path(args.work_dir) / f"{args.preset}_{dtype}_seed{seed}_steps{args.steps}"


def read(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def compare(values: dict[tuple[str, int], float]) -> dict:
    """values[(dtype, seed)] -> per-dtype mean and spread, the gap between the dtype means, and the verdict."""
    by = {d: [v for (dt, _), v in values.items() if dt == d] for d in DTYPES}
    mean = {d: float(np.mean(v)) for d, v in by.items()}
    spread = {d: float(np.max(v) - np.min(v)) for d, v in by.items()}
    gap = mean["bfloat16"] - mean["float32"]
    return {"mean": mean, "spread": spread, "gap": gap, "within": abs(gap) <= max(spread.values())}


def plot(args, curves: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"float32": "tab:blue", "bfloat16": "tab:orange"}
    for (dtype, seed), rows in curves.items():
        steps = np.array([r["step"] for r in rows])
        loss = np.array([r["loss"] for r in rows])
        k = min(10, len(loss))
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")  # a 10-step mean: one step's loss is noisy
        ax.plot(steps[k - 1:], smooth, color=colors[dtype], lw=1, alpha=0.8, label=f"{dtype} seed {seed} (train)")
        val = [r for r in rows if "val_loss" in r]
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o--", color=colors[dtype], ms=4, lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token); dots: validation")
    ax.set_title(f"{args.preset} preset: bf16 autocast vs fp32, {len(args.seed_list)} seeds each")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seeds", default="1337,1")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--parallel", type=int, default=2, help="runs at once (the cores are split between them)")
    ap.add_argument("--extra", default="", help="more `varlen train` options, e.g. '--train.eval_every 25'")
    ap.add_argument("--work-dir", default="/tmp/varlen_dtype_loss")
    ap.add_argument("--rerun", action="store_true", help="train again even where a finished run exists")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "dtype_loss"))
    args = ap.parse_args()
    args.seed_list = [int(s) for s in args.seeds.split(",")]
    if len(args.seed_list) < 2:
        ap.error("--seeds needs at least two seeds: the seed spread is the yardstick")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    info = machine_info(os.cpu_count() or 1, packages=())
    print(json.dumps(info))
    runs = [(d, s) for s in args.seed_list for d in DTYPES]
    run_all(args, runs)

    curves = {r: read(run_dir(args, *r)) for r in runs}
    evals = sorted({row["step"] for rows in curves.values() for row in rows if "val_loss" in row})
    report = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "seed_list"},
              "runs": {f"{d}/seed{s}": {"dir": str(run_dir(args, d, s)), "seconds": curves[(d, s)][-1]["time"]}
                       for d, s in runs}, "val": {}, "train_last20": None}
    header = "  ".join(f"{d[:4]}/s{s:<5}" for d, s in runs)
    print(f"\nval_loss   {header}   fp32 spread  bf16 spread  bf16-fp32  within seed spread")
    for step in evals:
        vals = {r: next(row["val_loss"] for row in curves[r] if row["step"] == step and "val_loss" in row)
                for r in runs}
        c = compare(vals)
        report["val"][step] = {"values": {f"{d}/seed{s}": v for (d, s), v in vals.items()}, **c}
        print(f"step {step:<5} " + "  ".join(f"{vals[r]:10.4f}" for r in runs)
              + f"   {c['spread']['float32']:11.4f}  {c['spread']['bfloat16']:11.4f}  {c['gap']:+9.4f}  "
              f"{'yes' if c['within'] else 'NO'}")
    last = {r: float(np.mean([row["loss"] for row in curves[r][-20:]])) for r in runs}
    c = compare(last)
    report["train_last20"] = {"values": {f"{d}/seed{s}": v for (d, s), v in last.items()}, **c}
    print(f"train loss, mean of the last 20 steps: " + ", ".join(f"{d}/seed{s} {v:.4f}" for (d, s), v in last.items())
          + f"; spreads fp32 {c['spread']['float32']:.4f} bf16 {c['spread']['bfloat16']:.4f}, gap {c['gap']:+.4f}, "
          f"within: {'yes' if c['within'] else 'NO'}")
    times = {d: np.mean([curves[(d, s)][-1]["time"] for s in args.seed_list]) for d in DTYPES}
    print(f"training seconds (mean over seeds, {args.parallel} runs at once): fp32 {times['float32']:.0f}, "
          f"bf16 {times['bfloat16']:.0f} ({times['float32'] / times['bfloat16']:.2f}x)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(args, curves, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
