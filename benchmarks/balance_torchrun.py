"""Load balance on real processes: `varlen train --nproc 2` (torchrun, gloo, one thread per rank) on the
stdlib corpus, each step's sequences split across the 2 ranks by the length-aware balancer
(`--data.balance cost`) or round-robin (`--data.balance round_robin`), same data, same steps.

A step ends when its slowest rank finishes (the gradient all-reduce waits for it), so the step time is
what balancing buys. Step times come from the runs' metrics.jsonl (`time`: training seconds, the max over
ranks of each step); the first `--warmup` steps are left out. Next to them, the cost model's max/mean rank
cost for the same steps, computed from the same loader plan.

    .venv/bin/python benchmarks/balance_torchrun.py            # ~8 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from machine import machine_info
from varlen.config import load_config
from varlen.data.balance import CostModel, balance, imbalance, round_robin
from varlen.data.corpus import Corpus
from varlen.data.loader import make_loader, step_layout
from varlen.data.tokens import prepare, split_documents

MODEL = {"model.vocab_size": "4096", "model.dim": "256", "model.n_layer": "4", "model.n_head": "4",
         "model.n_kv_head": "2"}


def options(seq_len: int, tokens_per_step: int, steps: int) -> dict[str, str]:
    return {**MODEL, "model.max_seq_len": str(seq_len), "data.tokens_per_step": str(tokens_per_step),
            "train.max_steps": str(steps), "train.eval_every": "0", "train.eval_tokens": "4096",
            "train.ckpt_every": "0", "train.warmup_steps": "2"}


def predicted(opts: dict[str, str], steps: int) -> dict[str, float]:
    """Mean max/mean rank cost (FLOP model) over the run's steps, for both splits, from the loader's plan."""
    cfg = load_config("tiny", None, opts)
    _, store = prepare(Corpus(cfg.data.corpus), cfg.model.vocab_size, log=lambda m: None)
    train_ids, _ = split_documents(store.num_docs, cfg.data.val_fraction)
    loader = make_loader(cfg.data, cfg.model.max_seq_len, cfg.train.grad_accum, store, train_ids, cfg.train.seed)
    cost = CostModel.from_flops(cfg.model)
    out: dict[str, list[float]] = {"cost": [], "round_robin": []}
    for _ in range(steps):
        lengths = [loader.seq_length(q) for spec in loader.next_specs() for q in spec]
        out["cost"].append(imbalance(balance(lengths, 2, cost), lengths, cost))
        out["round_robin"].append(imbalance(round_robin(lengths, 2), lengths, cost))
    return {k: float(np.mean(v)) for k, v in out.items()}


def run(out: Path, opts: dict[str, str], split: str) -> list[dict]:
    cmd = [sys.executable, "-m", "varlen", "train", "--nproc", "2", "--out", str(out), "--no-progress",
           "--train.threads", "1", "--data.balance", split]
    for k, v in opts.items():
        cmd += [f"--{k}", v]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="2048,8192")
    ap.add_argument("--tokens-per-step", type=int, default=32768, help="both ranks together")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    info = machine_info(threads=1, packages=())
    print(f"{info['date']} | {info['cpu']}, {info['logical_cpus']} cpus | torch {info['torch']} | 2 ranks "
          f"(torchrun, gloo) x 1 thread | stdlib corpus | model dim 256, 4 layers | {args.tokens_per_step:,} "
          f"tokens per step | {args.steps} steps, first {args.warmup} left out")
    print(f"{'max_seq_len':>11} {'split':>12} {'s/step':>8} {'predicted max/mean':>19} {'token max/mean':>15}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seq_len in [int(s) for s in args.seq_lens.split(",")]:
            opts = options(seq_len, args.tokens_per_step, args.steps)
            pred = predicted(opts, args.steps)
            times = {}
            for split in ("round_robin", "cost"):
                rows = run(Path(tmp) / f"{seq_len}-{split}", opts, split)
                t = np.diff([0.0] + [r["time"] for r in rows])[args.warmup:]
                shares = [max(r["rank_tokens"]) / np.mean(r["rank_tokens"]) for r in rows]
                times[split] = float(np.mean(t))
                results.append({"max_seq_len": seq_len, "split": split, "seconds_per_step": times[split],
                                "step_seconds": t.tolist(), "predicted_imbalance": pred[split],
                                "token_imbalance": float(np.mean(shares)), "loss_last": rows[-1]["loss"]})
                print(f"{seq_len:>11} {split:>12} {times[split]:>8.2f} {pred[split]:>19.3f} {np.mean(shares):>15.3f}")
            speedup = times["round_robin"] / times["cost"]
            results.append({"max_seq_len": seq_len, "speedup": speedup,
                            "predicted_speedup": pred["round_robin"] / pred["cost"]})
            print(f"{seq_len:>11} balanced step time = {1 / speedup:.3f} x round-robin (speedup {speedup:.2f}x; "
                  f"cost model predicts {pred['round_robin'] / pred['cost']:.2f}x)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"machine": info, "command": " ".join(sys.argv), "args": vars(args), "results": results}
    (out / "balance_torchrun.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out / 'balance_torchrun.json'}")


if __name__ == "__main__":
    main()
