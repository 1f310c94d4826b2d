"""Dataset Decomposition (Pouransari et al., 2024), pure: documents -> power-of-two chunks in length buckets,
and the order in which optimizer steps draw buckets (the variable-sequence-length curriculum).

A document with n input positions (tokens - 1) is cut into chunks of 2^hi while it is longer, then the rest
by the binary digits of its length, longest first (200 = 128 + 64 + 8). Chunks shorter than 2^lo are
dropped, or kept in the smallest bucket, and counted either way. Every chunk lies inside one document,
so no sequence attends across documents, and a step drawn from bucket i takes tokens_per_step / 2^i
sequences: tokens per step are the same whatever the bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .pack import Piece

CURRICULA = ("uniform", "grow_p2", "shortest_first", "cyclic")


@dataclass
class Decomposition:
    buckets: dict[int, list[Piece]]          # length 2^i -> chunks of that length (kept short ones in 2^lo)
    dropped_tokens: int = 0                  # input positions in chunks shorter than 2^lo, dropped
    kept_short_tokens: int = 0               # input positions in such chunks kept in the smallest bucket
    lengths: list[int] = field(default_factory=list)  # bucket lengths, ascending

    def bucket_tokens(self) -> dict[int, int]:
        return {L: sum(p.length for p in self.buckets[L]) for L in self.lengths}


def check_range(lo: int, hi: int, tokens_per_step: int) -> None:
    """The option errors of the issue, each naming the option and the fix."""
    if lo < 0 or hi < lo:
        raise ValueError(f"data.dd_lo ({lo}) and data.dd_hi ({hi}) need 0 <= lo <= hi (bucket lengths 2^lo..2^hi)")
    if tokens_per_step < 2 ** hi:
        raise ValueError(f"data.tokens_per_step ({tokens_per_step}) is smaller than the largest bucket 2^{hi} = "
                         f"{2 ** hi}; raise it or lower data.dd_hi")
    if tokens_per_step % 2 ** hi:
        raise ValueError(f"data.tokens_per_step ({tokens_per_step}) is not a multiple of the largest bucket "
                         f"{2 ** hi}, so steps of different buckets would hold different token counts; use a "
                         f"multiple of it")


def decompose(doc_ids: Sequence[int], doc_lengths: Sequence[int], lo: int, hi: int,
              keep_short: bool = False) -> Decomposition:
    """Cut each document into power-of-two chunks; doc_lengths count tokens (inputs = tokens - 1)."""
    if lo < 0 or hi < lo:
        raise ValueError(f"bucket range 2^{lo}..2^{hi} is empty; need 0 <= lo <= hi")
    top, low = 2 ** hi, 2 ** lo
    out = Decomposition({2 ** i: [] for i in range(lo, hi + 1)}, lengths=[2 ** i for i in range(lo, hi + 1)])
    for doc, n_tokens in zip(doc_ids, doc_lengths):
        n, start = int(n_tokens) - 1, 0
        while n - start >= top:
            out.buckets[top].append(Piece(int(doc), start, top))
            start += top
        rest = n - start
        for bit in range(hi - 1, -1, -1):
            size = 1 << bit
            if rest & size:
                if size >= low:
                    out.buckets[size].append(Piece(int(doc), start, size))
                elif keep_short:
                    out.buckets[low].append(Piece(int(doc), start, size))
                    out.kept_short_tokens += size
                else:
                    out.dropped_tokens += size
                start += size
    return out


def sequences_per_step(length: int, tokens_per_step: int) -> int:
    return max(1, tokens_per_step // length)


def bucket_steps(dec: Decomposition, tokens_per_step: int) -> dict[int, int]:
    """Whole optimizer steps each bucket fills in one epoch (a bucket's remainder waits for the next)."""
    steps = {}
    for L in dec.lengths:
        if L == dec.lengths[0] and dec.kept_short_tokens:
            steps[L] = sum(p.length for p in dec.buckets[L]) // tokens_per_step
        else:
            steps[L] = len(dec.buckets[L]) // sequences_per_step(L, tokens_per_step)
    return steps


def schedule(steps: dict[int, int], curriculum: str, seed: int, cycles: int = 1) -> list[int]:
    """The bucket length of every optimizer step of one epoch; the same list on every rank for a seed.

    uniform: buckets drawn at random, each in proportion to the steps it still holds (so all run out
    together); grow_p2: within each of `cycles` cycles, bucket i is drawn with odds 2^(hi - i) times its
    remaining steps, so short buckets dominate early and long ones late (the DD paper's power-of-two
    growth); shortest_first: all of the shortest bucket, then the next; cyclic: short to long and back to
    short, one step of each non-empty bucket at a time.
    """
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown curriculum {curriculum!r}; use one of {', '.join(CURRICULA)}")
    if cycles < 1:
        raise ValueError(f"data.dd_cycles is {cycles}; it must be at least 1")
    lengths = sorted(L for L, n in steps.items() if n > 0)
    rng = np.random.default_rng(seed)
    if curriculum == "shortest_first":
        return [L for L in lengths for _ in range(steps[L])]
    if curriculum == "cyclic":
        left, order = dict(steps), []
        sweep = lengths + lengths[-2:0:-1]
        while any(left[L] for L in lengths):
            for L in sweep:
                if left[L]:
                    order.append(L)
                    left[L] -= 1
        return order
    order = []
    n_cycles = cycles if curriculum == "grow_p2" else 1
    for c in range(n_cycles):
        # Cycle c gets an even share of each bucket's steps (floor differences spread the remainders, so a
        # bucket with fewer steps than there are cycles skips the first ones).
        left = {L: steps[L] * (c + 1) // n_cycles - steps[L] * c // n_cycles for L in lengths}
        odds = {L: (2.0 ** (len(lengths) - 1 - k) if curriculum == "grow_p2" else 1.0)
                for k, L in enumerate(lengths)}
        while True:
            live = [L for L in lengths if left[L]]
            if not live:
                break
            w = np.array([odds[L] * left[L] for L in live], dtype=np.float64)
            L = live[int(rng.choice(len(live), p=w / w.sum()))]
            order.append(L)
            left[L] -= 1
    return order


def step_chunks(dec: Decomposition, order: list[int], tokens_per_step: int, seed: int) -> list[list[Piece]]:
    """The chunks of every step in `order`: each bucket shuffled once (by seed), then dealt out in turn."""
    rng = np.random.default_rng(seed)
    shuffled = {L: [dec.buckets[L][i] for i in rng.permutation(len(dec.buckets[L]))] for L in dec.lengths}
    taken = {L: 0 for L in dec.lengths}
    steps = []
    for L in order:
        chunks, total = [], 0
        if L == dec.lengths[0] and dec.kept_short_tokens:
            # Mixed lengths in the smallest bucket: fill the step up to tokens_per_step.
            while taken[L] < len(shuffled[L]) and total + shuffled[L][taken[L]].length <= tokens_per_step:
                chunks.append(shuffled[L][taken[L]])
                total += chunks[-1].length
                taken[L] += 1
        else:
            k = sequences_per_step(L, tokens_per_step)
            chunks = shuffled[L][taken[L]:taken[L] + k]
            taken[L] += k
        steps.append(chunks)
    return steps
