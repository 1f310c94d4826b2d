"""What a linear layer costs with a few rows instead of one: the premise of speculative decoding.

Verifying k drafts runs k + 1 query rows per request through every weight matrix. On hardware where a
one-row matmul is bound by reading the weights, k + 1 rows cost about as much as one, and drafts are nearly
free; where it is not, a verify step costs more, and the speed-up is tokens per step divided by that cost.

For each weight shape (the tiny and small presets' projections, and matrices far larger than the caches),
times F.linear on 1, 2, 4, 5, 8 and 16 rows and prints the time relative to one row. Several copies of each
matrix are cycled through, more bytes than the last-level cache holds, so every call reads its weights from
memory as a decode step does (a step touches every layer's weights once).

    .venv/bin/python benchmarks/rows_matmul.py --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from machine import machine_info, matrix_units

SHAPES = {  # name: (in, out)
    "tiny qkv/o 192x192": (192, 192),
    "tiny mlp up 192x512": (192, 512),
    "tiny vocab 192x4096": (192, 4096),
    "small mlp up 384x1024": (384, 1024),
    "small vocab 384x8192": (384, 8192),
    "large 2048x8192": (2048, 8192),
}
ROWS = (1, 2, 4, 5, 8, 16)


def time_linear(k: int, n: int, rows: int, copies: int, min_seconds: float) -> float:
    """Median seconds per call over repeats, each call on the next of `copies` weight matrices."""
    weights = [torch.randn(n, k) for _ in range(copies)]
    x = torch.randn(rows, k)
    for w in weights:
        F.linear(x, w)
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(samples) < 5:
        t0 = time.perf_counter()
        for w in weights:
            F.linear(x, w)
        samples.append((time.perf_counter() - t0) / copies)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--cache-mib", type=float, default=64.0, help="bytes of weights cycled per shape, at least")
    ap.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rows_matmul.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.get_num_threads(), packages=())
    print(json.dumps(info))
    print(f"CPU {info['cpu']} | matrix units: {matrix_units(info)}")
    print(f"{'weights':24s} " + " ".join(f"{r:>6d} rows" for r in ROWS) + "   (time / time of 1 row; 1 row in us)")
    results = []
    for name, (k, n) in SHAPES.items():
        copies = max(1, int(args.cache_mib * 2 ** 20 // (4 * k * n)))
        times = {r: time_linear(k, n, r, copies, args.seconds) for r in ROWS}
        base = times[1]
        print(f"{name:24s} " + " ".join(f"{times[r] / base:10.2f}" for r in ROWS) + f"   {base * 1e6:8.1f} us")
        results.append({"name": name, "in": k, "out": n, "copies": copies,
                        "seconds": {str(r): t for r, t in times.items()}})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "params": vars(args), "results": results}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
