"""Per-step sequence-parallel planning (FlexSP-style), pure.

Ulysses sequence parallelism trains packed rows on a group of d ranks: each rank holds a contiguous 1/d of
every row, and all-to-alls around attention swap sequence shards for head shards. A document longer than one
rank's token cap (`data.rank_tokens`) then trains whole instead of being cut, but every split pays for the
all-to-all. So each step we choose how to cut the R ranks into groups (sizes from `degrees`) and which
sequences each group trains, minimising the step's makespan (its slowest group) under the per-rank cap.
Degree 1 everywhere is today's data parallelism (balance.py); one degree everywhere is static SP.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from .balance import CostModel, balance

# Auto mode solves exactly (branch and bound over every assignment, for every partition of the ranks) when a
# step has at most this many sequences and ranks; above it, longest-first greedy plus refinement.
EXACT_MAX_SEQS = 8
EXACT_MAX_RANKS = 4
# Partitions of the ranks tried per step. Power-of-two degrees give 202 partitions of 32 ranks and 1,828 of
# 64; awkward inputs (every size 1..64 allowed: 1.7 million) are truncated to this many, enumerated with the
# fewest large groups first (a step has few long documents), plus every one-size partition (so auto is never
# worse than data parallelism or static SP), each able to host the step's longest sequence.
MAX_PARTITIONS = 4096
# Outside the exact regime, partitions are scored (greedy plus refinement) in order of their lower bound, at
# most this many besides the one-size ones. On long-tailed steps the bound is within 1-2% of the greedy's
# makespan, too loose to prune the ~1,800 partitions of 64 ranks, but the best came among the first few tried.
MAX_TRIED = 16
# What moving one byte between ranks costs in FLOPs of compute forgone, for the FLOP cost model: ~100 GFLOP/s of
# CPU matmul over ~5 GB/s through gloo on one machine is 20 (a GPU over NVLink is nearer 1,000). Only the
# ratio to the compute terms matters to the planner; it makes splitting a sequence cost something, so short
# sequences stay on one rank.
COMM_FLOPS_PER_BYTE = 20.0
_REL = 1e-12  # a new plan must beat the best by this much (relative) to replace it: float noise is no win


@dataclass(frozen=True)
class SPCost(CostModel):
    c: float = 0.0  # all-to-all time per token that leaves a rank (0: communication is free)

    def seq_time(self, length: int, degree: int) -> float:
        """Per-rank time of one sequence in a group of `degree` ranks: its compute split d ways, plus the
        all-to-all of this rank's L/d tokens, of which (d-1)/d go to other ranks (nothing when d == 1)."""
        return self(length) / degree + self.c * length * (degree - 1) / (degree * degree)

    @classmethod
    def from_cost(cls, cost: CostModel, c: float) -> "SPCost":
        return cls(cost.a, cost.b, c)

    @classmethod
    def from_flops(cls, cfg, flops_per_byte: float = COMM_FLOPS_PER_BYTE, element_bytes: int = 4) -> "SPCost":
        """CostModel.from_flops plus the all-to-all in FLOP-equivalents, priced at `flops_per_byte` (the
        compute one byte on the link costs: an assumption; `varlen bench calibrate` measures it)."""
        cost = CostModel.from_flops(cfg)
        return cls(cost.a, cost.b, a2a_bytes_per_token(cfg, element_bytes) * flops_per_byte)


def a2a_bytes_per_token(cfg, element_bytes: int = 4) -> float:
    """Bytes one token sends through Ulysses' all-to-alls in a training step: per layer, forward sends its q, k,
    v and receives its output (2H + 2Hkv heads of head_dim), backward the same again, in elements of
    `element_bytes` (4 in fp32; 2 under bf16 autocast, whose projections give bf16 q, k and v)."""
    return element_bytes * 2 * (2 * cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim * cfg.n_layer


@dataclass(frozen=True)
class Group:
    ranks: tuple[int, ...]  # contiguous rank ids
    seqs: tuple[int, ...]   # indices into the step's lengths, ascending

    @property
    def degree(self) -> int:
        return len(self.ranks)

    def time(self, lengths: Sequence[int], cost: SPCost) -> float:
        return sum(cost.seq_time(lengths[i], self.degree) for i in self.seqs)


@dataclass(frozen=True)
class Plan:
    groups: tuple[Group, ...]  # larger groups first, ranks 0..R-1 in order

    @property
    def num_ranks(self) -> int:
        return sum(g.degree for g in self.groups)

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(g.degree for g in self.groups)

    def group_of(self, rank: int) -> Group:
        for g in self.groups:
            if g.ranks[0] <= rank <= g.ranks[-1]:
                return g
        raise ValueError(f"rank {rank} is not in this plan of {self.num_ranks} ranks")

    def degree_of_rank(self, rank: int) -> int:
        return self.group_of(rank).degree

    def times(self, lengths: Sequence[int], cost: SPCost) -> list[float]:
        """Per-rank time of each group."""
        return [g.time(lengths, cost) for g in self.groups]

    def makespan(self, lengths: Sequence[int], cost: SPCost) -> float:
        return max(self.times(lengths, cost), default=0.0)

    def rank_tokens(self, lengths: Sequence[int]) -> list[int]:
        """Tokens each rank holds over the step. A group of d ranks splits a sequence of L tokens (the split a
        sequence-parallel loader is to use): L // d each, and the group's first L % d ranks one more."""
        out = [0] * self.num_ranks
        for g in self.groups:
            for k, r in enumerate(g.ranks):
                out[r] = sum(lengths[i] // g.degree + (k < lengths[i] % g.degree) for i in g.seqs)
        return out


def plan_step(lengths: Sequence[int], ranks: int, cost: CostModel, cap: int,
              degrees: Sequence[int] | None = None, mode: str = "auto",
              static_degree: int | None = None) -> Plan:
    """Group the ranks and assign the step's sequences to groups, minimising the makespan.

    mode "auto": any partition of `ranks` into groups with sizes from `degrees` (default: the divisors of
    `ranks`); exact at most EXACT_MAX_SEQS sequences and EXACT_MAX_RANKS ranks, greedy plus refinement above.
    mode "static": groups of `static_degree` ranks. mode "dp": groups of one rank, assigned by balance().
    A sequence can only go to a group of d ranks with d * cap >= its length. A plain CostModel means free
    communication (c = 0). Deterministic: the same input gives the same Plan on every rank."""
    lengths = [int(n) for n in lengths]
    if ranks < 1:
        raise ValueError(f"need at least one rank, got {ranks}")
    if cap < 1:
        raise ValueError(f"the per-rank token cap (data.rank_tokens) must be positive, got {cap}")
    if any(n < 1 for n in lengths):
        raise ValueError(f"sequence lengths must be positive, got {min(lengths)}")
    if static_degree is not None and mode != "static":
        raise ValueError(f"static_degree={static_degree} only applies to mode='static', not mode={mode!r}")
    if not isinstance(cost, SPCost):
        cost = SPCost.from_cost(cost, 0.0)
    longest = max(lengths, default=0)
    if mode == "dp":
        if longest > cap:
            raise ValueError(f"data parallelism trains at most cap={cap} tokens per sequence, got one of "
                             f"{longest}: cut it first (cut_to_cap) or plan with mode='auto'")
        return _search(lengths, ranks, cost, cap, [(1,) * ranks], exact=False)
    if mode == "static":
        if static_degree is None or not 1 <= static_degree <= ranks or ranks % static_degree:
            raise ValueError(f"mode='static' needs static_degree dividing ranks={ranks}, got {static_degree}")
        if degrees is not None and static_degree not in degrees:
            raise ValueError(f"static_degree={static_degree} is not among the allowed degrees {sorted(degrees)}")
        _check_fits(longest, cap, static_degree, "raise data.rank_tokens or use a larger static degree")
        return _search(lengths, ranks, cost, cap, [(static_degree,) * (ranks // static_degree)], exact=False)
    if mode != "auto":
        raise ValueError(f"unknown mode {mode!r}; use 'auto', 'static' or 'dp'")
    allowed = tuple(sorted(set(degrees))) if degrees is not None else \
        tuple(d for d in range(1, ranks + 1) if ranks % d == 0)
    if not allowed or allowed[0] < 1 or allowed[-1] > ranks:
        raise ValueError(f"degrees must lie in 1..ranks={ranks}, got {list(degrees or [])}")
    _check_fits(longest, cap, allowed[-1], "raise data.rank_tokens or allow a larger sequence-parallel degree")
    need = min(d for d in allowed if d * cap >= longest)
    candidates = partitions(ranks, allowed, need)
    if not candidates:
        raise ValueError(f"no partition of {ranks} ranks into groups of {list(allowed)} ranks can host the "
                         f"longest sequence ({longest} tokens: {need} ranks at cap {cap}); allow degree 1, or "
                         f"a degree dividing {ranks} that holds it")
    exact = len(lengths) <= EXACT_MAX_SEQS and ranks <= EXACT_MAX_RANKS
    return _search(lengths, ranks, cost, cap, list(candidates), exact)


def _check_fits(longest: int, cap: int, degree: int, fix: str) -> None:
    if longest > degree * cap:
        raise ValueError(f"a sequence of {longest} tokens does not fit: {degree} ranks x cap {cap} tokens per "
                         f"rank (data.rank_tokens) hold {degree * cap}; {fix}")


@lru_cache(maxsize=64)
def partitions(ranks: int, degrees: tuple[int, ...], need: int = 1) -> tuple[tuple[int, ...], ...]:
    """Multisets of group sizes from `degrees` that sum to `ranks` and have a group of at least `need`,
    each largest first; at most MAX_PARTITIONS of them plus the one-size ones (see MAX_PARTITIONS)."""
    ds = sorted(set(degrees), reverse=True)
    # reach[k]: totals writable with sizes ds[k:], so the walk never enters a dead end
    reach = [set() for _ in ds] + [{0}]
    for k in range(len(ds) - 1, -1, -1):
        reach[k] = {s + m * ds[k] for s in reach[k + 1] for m in range((ranks - s) // ds[k] + 1)}
    out: list[tuple[int, ...]] = []

    def walk(rest: int, k: int, prefix: tuple[int, ...]) -> None:
        if len(out) >= MAX_PARTITIONS:
            return
        if rest == 0:
            if prefix and prefix[0] >= need:
                out.append(prefix)
            return
        if k == len(ds) or (ds[k] < need and not (prefix and prefix[0] >= need)):
            return
        for m in range(rest // ds[k] + 1):  # fewest groups of this size first
            if rest - m * ds[k] in reach[k + 1]:
                walk(rest - m * ds[k], k + 1, prefix + (ds[k],) * m)

    walk(ranks, 0, ())
    for d in ds:
        if ranks % d == 0 and d >= need and (d,) * (ranks // d) not in out:
            out.append((d,) * (ranks // d))
    return tuple(out)


@dataclass(frozen=True)
class _Step:
    """What every candidate partition is scored against, computed once per step."""
    lengths: list[int]
    cap: int
    cost: SPCost
    t: dict[int, list[float]]  # size -> per-rank time of each sequence in a group of that size
    order: list[int]           # sequence indices, costliest first, ties by index
    by_length: list[int]       # the lengths ascending, and prefix sums of their tokens and of cost(L)
    token_sums: list[int]
    work_sums: list[float]

    def fits(self, i: int, size: int) -> bool:
        return size * self.cap >= self.lengths[i]


def _search(lengths: list[int], ranks: int, cost: SPCost, cap: int, candidates: list[tuple[int, ...]],
            exact: bool) -> Plan:
    """The best plan over the candidate partitions, tried in order of a lower bound on their makespan and
    stopping once the bound reaches the best plan found (no later partition can beat it); unless exact, only
    the first MAX_TRIED and the one-size partitions are scored."""
    sizes = sorted({d for parts in candidates for d in parts})
    by_length = sorted(lengths)
    step = _Step(lengths, cap, cost, {d: [cost.seq_time(n, d) for n in lengths] for d in sizes},
                 sorted(range(len(lengths)), key=lambda i: (-cost(lengths[i]), i)), by_length,
                 list(itertools.accumulate(by_length, initial=0)),
                 list(itertools.accumulate((cost(n) for n in by_length), initial=0.0)))
    by_sizes: dict[tuple[int, ...], tuple[float, list[float]]] = {}  # the bound's parts that need only sizes
    bounds = []
    for parts in candidates:
        key = tuple(sorted(set(parts)))
        if key not in by_sizes:
            by_sizes[key] = _size_bounds(step, key)
        bounds.append((_lower_bound(parts, key, *by_sizes[key]), -len(parts), parts))
    bounds.sort()
    best: tuple[float, Plan] | None = None
    for tried, (bound, _, parts) in enumerate(bounds):
        if best is not None and bound >= best[0] * (1 - _REL):
            break
        if not exact and tried >= MAX_TRIED and len(set(parts)) > 1:
            continue  # past the cap only the one-size partitions: auto never loses to dp or static SP
        seqs = _greedy(step, parts)
        if exact:
            seqs = _exact(step, parts, seqs)
        plan = _layout(parts, seqs)
        span = plan.makespan(lengths, cost)
        if best is None or span < best[0] * (1 - _REL):
            best = (span, plan)
    assert best is not None  # every candidate can host every sequence
    return best[1]


def _size_bounds(step: _Step, sizes: tuple[int, ...]) -> tuple[float, list[float]]:
    """For groups of these sizes (ascending): the time of the slowest single sequence at its best feasible size
    (the longest one's: a longer sequence is slower at every size and fits fewer), and per size the least
    rank-time of the sequences whose smallest feasible size it is. A sequence's rank-time, d x its per-rank
    time = a*L + b*L^2 + c*L*(d-1)/d, grows with d, so it is least at the smallest size that holds it."""
    longest = step.by_length[-1] if step.by_length else 0
    single = min(step.cost.seq_time(longest, s) for s in sizes if s * step.cap >= longest)
    need_work, lo = [], 0
    for s in sizes:  # the sequences first held by size s are a run of the sorted lengths
        hi = bisect.bisect_right(step.by_length, s * step.cap)
        tokens = step.token_sums[hi] - step.token_sums[lo]
        need_work.append(step.work_sums[hi] - step.work_sums[lo] + step.cost.c * tokens * (s - 1) / s)
        lo = hi
    return single, need_work


def _lower_bound(parts: tuple[int, ...], sizes: tuple[int, ...], single: float, need_work: list[float]) -> float:
    """No assignment onto these groups beats this: the slowest single sequence, and for each size s the
    rank-time of the sequences only groups of s or more ranks hold, spread evenly over those groups' ranks."""
    spread, work = 0.0, 0.0
    for k in range(len(sizes) - 1, -1, -1):
        work += need_work[k]
        spread = max(spread, work / sum(p for p in parts if p >= sizes[k]))
    return max(single, spread)


def _greedy(step: _Step, parts: tuple[int, ...]) -> list[list[int]]:
    """Sequence indices per group: costliest first onto the group whose finish time after taking it is least
    (among groups big enough), then, while that lowers the pair's max, single moves from the costliest group
    to the least loaded group of each size, or swaps with the least loaded group of all. Groups of one rank
    only: balance() itself."""
    if all(d == 1 for d in parts):
        return balance(step.lengths, len(parts), step.cost)
    sizes, t = sorted(set(parts), reverse=True), step.t
    loads = [0.0] * len(parts)
    seqs: list[list[int]] = [[] for _ in parts]
    heaps = {d: [(0.0, g) for g, p in enumerate(parts) if p == d] for d in sizes}  # (load, group) per size
    for i in step.order:
        # groups of one size take a sequence in the same time, so only each size's least loaded can win
        _, g, d = min((heaps[d][0][0] + t[d][i], heaps[d][0][1], d) for d in sizes if step.fits(i, d))
        heapq.heapreplace(heaps[d], (loads[g] + t[d][i], g))
        loads[g] += t[d][i]
        seqs[g].append(i)
    for _ in range(min(4 * len(step.lengths), 200)):
        hi = max(range(len(parts)), key=lambda g: (loads[g], -g))
        dh = parts[hi]
        lows = [min((loads[g], g) for g in range(len(parts)) if parts[g] == d and g != hi) for d in sizes
                if parts.count(d) > (d == dh)]
        lo = min(lows)[1] if lows else hi
        best = None  # (new max of the pair, moved from hi, partner group, moved back or None)
        for i in seqs[hi]:
            for _, g in lows:
                dg = parts[g]
                if not step.fits(i, dg):
                    continue
                cand = max(loads[hi] - t[dh][i], loads[g] + t[dg][i])
                if best is None or cand < best[0]:
                    best = (cand, i, g, None)
                if g != lo or len(seqs[hi]) * len(seqs[g]) > 4096:
                    continue  # swaps are quadratic: only with the least loaded group, and moves alone if many
                for j in seqs[g]:
                    if step.fits(j, dh):
                        cand = max(loads[hi] - t[dh][i] + t[dh][j], loads[g] - t[dg][j] + t[dg][i])
                        if cand < best[0]:
                            best = (cand, i, g, j)
        if best is None or best[0] >= loads[hi] * (1 - _REL):
            break
        _, i, g, j = best
        seqs[hi].remove(i)
        seqs[g].append(i)
        loads[hi] -= t[dh][i]
        loads[g] += t[parts[g]][i]
        if j is not None:
            seqs[g].remove(j)
            seqs[hi].append(j)
            loads[g] -= t[parts[g]][j]
            loads[hi] += t[dh][j]
    return [sorted(s) for s in seqs]


def _exact(step: _Step, parts: tuple[int, ...], start: list[list[int]]) -> list[list[int]]:
    """The assignment onto these groups with the least makespan: branch and bound from the `start` assignment,
    placing sequences costliest first and pruning by the current max and by rank-time over all ranks."""
    n, ranks = len(step.lengths), sum(parts)
    t = [[step.t[d][i] for d in parts] for i in step.order]  # t[k][g]: k-th costliest sequence in group g
    fits = [[g for g, d in enumerate(parts) if step.fits(i, d)] for i in step.order]
    least = [min(parts[g] * t[k][g] for g in fits[k]) for k in range(n)]  # least rank-time of each
    rest = [sum(least[k:]) for k in range(n + 1)]
    loads, counts, choice = [0.0] * len(parts), [0] * len(parts), [0] * n
    best = [max(sum(step.t[d][i] for i in s) for s, d in zip(start, parts)), None]

    def place(k: int, top: float, used: float) -> None:
        if max(top, (used + rest[k]) / ranks) >= best[0]:
            return
        if k == n:
            best[:] = [top, choice.copy()]
            return
        tried = set()  # empty groups of one size are interchangeable: try one of them
        for g in fits[k]:
            if counts[g] == 0:
                if parts[g] in tried:
                    continue
                tried.add(parts[g])
            loads[g] += t[k][g]
            counts[g] += 1
            choice[k] = g
            place(k + 1, max(top, loads[g]), used + parts[g] * t[k][g])
            loads[g] -= t[k][g]
            counts[g] -= 1

    place(0, 0.0, 0.0)
    if best[1] is None:
        return start
    seqs: list[list[int]] = [[] for _ in parts]
    for k, g in enumerate(best[1]):
        seqs[g].append(step.order[k])
    return [sorted(s) for s in seqs]


def _layout(parts: tuple[int, ...], seqs: list[list[int]]) -> Plan:
    """Groups on contiguous rank ranges in the order of `parts` (largest first)."""
    groups, start = [], 0
    for d, s in zip(parts, seqs):
        groups.append(Group(tuple(range(start, start + d)), tuple(s)))
        start += d
    return Plan(tuple(groups))


def cut_to_cap(lengths: Sequence[int], cap: int) -> list[int]:
    """How data parallelism trains documents longer than one rank's cap: each cut into pieces of `cap`
    tokens, the last holding the remainder, in order."""
    return [min(cap, n - s) for n in lengths for s in range(0, n, cap)]


def full_context_share(lengths: Sequence[int], cap_per_seq: int) -> float:
    """Share of tokens trained with their whole preceding document in context when documents are cut at
    `cap_per_seq` tokens: only a document's first piece has it (1.0 for no tokens)."""
    total = sum(lengths)
    return sum(min(n, cap_per_seq) for n in lengths) / total if total else 1.0
