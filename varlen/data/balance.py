"""Length-aware load balancing across data-parallel ranks, pure.

A sequence of L tokens costs cost(L) = a*L + b*L^2: the linear term is the matmuls, the quadratic one
causal attention. A step's sequences are split over R ranks to minimise the largest rank's cost, so no
rank waits on a straggler holding all the long documents.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Sequence

from ..config import ModelConfig


@dataclass(frozen=True)
class CostModel:
    a: float   # seconds (or FLOPs) per token
    b: float   # per token pair (attention)

    def __call__(self, length: int) -> float:
        return self.a * length + self.b * length * length

    @classmethod
    def from_flops(cls, cfg: ModelConfig) -> "CostModel":
        """Forward+backward FLOPs: 6 x matmul parameters per token, and causal attention's
        3 x (2 matmuls x 2 FLOPs x H x head_dim) x L/2 keys per token per layer."""
        d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
        per_layer = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2 + 3 * d * f
        a = 6.0 * (cfg.n_layer * per_layer + d * cfg.vocab_size)
        b = 3.0 * cfg.n_layer * 2 * 2 * cfg.n_head * hd / 2
        return cls(a, b)


def round_robin(lengths: Sequence[int], ranks: int) -> list[list[int]]:
    """The naive split (sequence i to rank i mod R), the baseline balancing is measured against."""
    return [list(range(r, len(lengths), ranks)) for r in range(ranks)]


def balance(lengths: Sequence[int], ranks: int, cost: CostModel) -> list[list[int]]:
    """Sequence indices per rank: longest-first greedy onto the cheapest rank, then a refinement pass that
    moves or swaps single sequences between the costliest and the cheapest rank while that lowers the max."""
    if ranks < 1:
        raise ValueError(f"need at least one rank, got {ranks}")
    costs = [cost(n) for n in lengths]
    order = sorted(range(len(lengths)), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(ranks)]
    groups: list[list[int]] = [[] for _ in range(ranks)]
    totals = [0.0] * ranks
    for i in order:
        total, r = heapq.heappop(heap)
        groups[r].append(i)
        totals[r] = total + costs[i]
        heapq.heappush(heap, (totals[r], r))
    for _ in range(min(4 * len(lengths), 200)):
        hi = max(range(ranks), key=lambda r: totals[r])
        lo = min(range(ranks), key=lambda r: totals[r])
        gap = totals[hi] - totals[lo]
        best = None  # (new max of the pair, move)
        for i in groups[hi]:
            if costs[i] < gap:  # moving i lowers the pair's max
                cand = max(totals[hi] - costs[i], totals[lo] + costs[i])
                if best is None or cand < best[0]:
                    best = (cand, i, None)
            if len(groups[hi]) * len(groups[lo]) > 4096:
                continue  # swaps are quadratic; with this many sequences, moves alone balance well
            for j in groups[lo]:
                d = costs[i] - costs[j]
                if 0 < d < gap:
                    cand = max(totals[hi] - d, totals[lo] + d)
                    if best is None or cand < best[0]:
                        best = (cand, i, j)
        if best is None or best[0] >= totals[hi] - 1e-12 * max(1.0, totals[hi]):
            break
        _, i, j = best
        groups[hi].remove(i)
        groups[lo].append(i)
        totals[hi] -= costs[i]
        totals[lo] += costs[i]
        if j is not None:
            groups[lo].remove(j)
            groups[hi].append(j)
            totals[lo] -= costs[j]
            totals[hi] += costs[j]
    return [sorted(g) for g in groups]


def imbalance(groups: Sequence[Sequence[int]], lengths: Sequence[int], cost: CostModel) -> float:
    """max / mean rank cost (1.0 = perfect)."""
    totals = [sum(cost(lengths[i]) for i in g) for g in groups]
    mean = sum(totals) / len(totals)
    return max(totals) / mean if mean > 0 else 1.0


def target_weights(groups: Sequence[Sequence[int]], num_targets: Sequence[int]) -> list[float]:
    """Each rank's share of the step's target tokens: a rank's mean loss times its share, summed over ranks
    (all-reduce sum), gives the token-mean loss of the whole step, so the gradient equals one process's."""
    total = sum(num_targets)
    return [sum(num_targets[i] for i in g) / total for g in groups]
