"""Load balance across data-parallel ranks, simulated on the stdlib corpus: max/mean rank cost per step,
length-aware balancing (varlen.data.balance) vs round-robin, for R = 2, 4, 8 ranks.

Each step takes pieces of the corpus (documents cut to max_seq_len) in a random order until it holds
R x tokens_per_rank tokens, as packed training draws them; the cost of a piece is the FLOP model
cost(L) = a*L + b*L^2 of the benchmark model (the same as benchmarks/train_throughput.py's).

    .venv/bin/python benchmarks/balance.py
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
from pathlib import Path

import numpy as np

from varlen.config import ModelConfig
from varlen.data.balance import CostModel, balance, imbalance, round_robin
from varlen.data.corpus import Corpus
from varlen.data.pack import cut_pieces
from varlen.data.tokens import prepare


def steps_of(lengths: np.ndarray, tokens_per_step: int, n_steps: int, seed: int) -> list[list[int]]:
    order = np.random.default_rng(seed).permutation(len(lengths))
    steps, step, used = [], [], 0
    for i in order:
        if used + lengths[i] > tokens_per_step and step:
            steps.append(step)
            if len(steps) == n_steps:
                break
            step, used = [], 0
        step.append(int(lengths[i]))
        used += int(lengths[i])
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="2048,8192")
    ap.add_argument("--ranks", default="2,4,8")
    ap.add_argument("--tokens-per-rank", type=int, default=16384, help="useful tokens per rank per step")
    ap.add_argument("--steps", type=int, default=200, help="simulated steps per setting")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    _, store = prepare(Corpus("stdlib"), 4096)
    cfg = ModelConfig(vocab_size=4096, dim=256, n_layer=4, n_head=4, n_kv_head=2)
    cost = CostModel.from_flops(cfg)
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')} | stdlib corpus, {store.num_docs:,} documents, "
          f"{store.num_tokens:,} tokens | cost(L) = {cost.a:.3g} L + {cost.b:.3g} L^2 (FLOPs, dim 256, 4 layers) | "
          f"{args.tokens_per_rank:,} tokens per rank per step, {args.steps} steps per setting")
    print(f"{'max_seq_len':>11} {'ranks':>5} {'pieces/step':>11} {'round-robin max/mean':>21} {'balanced max/mean':>18} "
          f"{'worst balanced':>14} {'lower bound':>11} {'optimum':>8}")
    results = []
    for seq_len in [int(s) for s in args.seq_lens.split(",")]:
        pieces = cut_pieces(np.arange(store.num_docs), store.lengths, seq_len)
        lengths = np.array([p.length for p in pieces])
        for ranks in [int(r) for r in args.ranks.split(",")]:
            rr, bal, sizes, bound, optimum = [], [], [], [], []
            for step in steps_of(lengths, ranks * args.tokens_per_rank, args.steps, args.seed):
                sizes.append(len(step))
                rr.append(imbalance(round_robin(step, ranks), step, cost))
                bal.append(imbalance(balance(step, ranks, cost), step, cost))
                # No split beats this: the costliest single piece, or a perfectly even share.
                costs = [cost(n) for n in step]
                bound.append(max(max(costs), sum(costs) / ranks) / (sum(costs) / ranks))
                if ranks == 2 and len(step) <= 20:  # the exact optimum, by trying every split
                    best = min(max(sum(c for c, m in zip(costs, mask) if m), sum(c for c, m in zip(costs, mask) if not m))
                               for mask in itertools.product((0, 1), repeat=len(step)))
                    optimum.append(best / (sum(costs) / 2))
            row = {"max_seq_len": seq_len, "ranks": ranks, "pieces_per_step": float(np.mean(sizes)),
                   "round_robin": float(np.mean(rr)), "balanced": float(np.mean(bal)), "balanced_worst": max(bal),
                   "lower_bound": float(np.mean(bound)),
                   "optimum": float(np.mean(optimum)) if len(optimum) == len(bal) else None}
            results.append(row)
            print(f"{seq_len:>11} {ranks:>5} {row['pieces_per_step']:>11.1f} {row['round_robin']:>21.3f} "
                  f"{row['balanced']:>18.3f} {row['balanced_worst']:>14.3f} {row['lower_bound']:>11.3f} "
                  f"{'-' if row['optimum'] is None else format(row['optimum'], '.3f'):>8}")
    ok = all(r["balanced"] <= 1.05 for r in results)
    print(f"target: balanced max/mean <= 1.05 in every setting -> {'PASS' if ok else 'FAIL'}; lower bound = mean "
          f"over steps of max(costliest piece, even share) / even share; optimum (R = 2, steps of <= 20 pieces) = the best "
          f"split found by trying all of them: no assignment of whole pieces does better")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "balance.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    print(f"wrote {out / 'balance.json'}")
    print(f"plot: {plot(results, out / 'balance_torchrun.json', out / 'balance.png', args.tokens_per_rank)}")


def plot(results: list[dict], real_json: Path, path: Path, tokens_per_rank: int) -> Path:
    """Left: simulated max/mean rank cost; right: the real 2-rank step times of balance_torchrun.py, if run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [f"{r['max_seq_len']}\nR={r['ranks']}" for r in results]
    x = np.arange(len(results))
    for k, (key, name) in enumerate([("round_robin", "round-robin"), ("balanced", "balanced (varlen)")]):
        ax.bar(x + (k - 0.5) * 0.4, [r[key] for r in results], 0.4, label=name)
    ax.axhline(1.05, color="gray", ls="--", lw=1, label="target 1.05")
    ax.set_xticks(x, labels)
    ax.set_ylim(0.9, max(r["round_robin"] for r in results) * 1.08)
    ax.set_ylabel("max / mean rank cost (FLOP model)")
    ax.set_title(f"simulated, stdlib corpus, {tokens_per_rank:,} tokens per rank")
    ax.legend(fontsize=8)
    if real_json.exists():
        real = [r for r in json.loads(real_json.read_text())["results"] if "split" in r]
        lens = sorted({r["max_seq_len"] for r in real})
        for k, split in enumerate(["round_robin", "cost"]):
            t = [next(r["seconds_per_step"] for r in real if r["max_seq_len"] == L and r["split"] == split) for L in lens]
            bx.bar(np.arange(len(lens)) + (k - 0.5) * 0.4, t, 0.4,
                   label="round-robin" if split == "round_robin" else "balanced (varlen)")
        bx.set_xticks(np.arange(len(lens)), [f"max_seq_len {L}" for L in lens])
        bx.set_ylabel("seconds per step (slowest rank)")
        bx.set_title("real: varlen train --nproc 2 (torchrun, gloo), 32,768 tokens per step")
        bx.legend(fontsize=8)
    else:
        bx.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
