"""Pure packing decisions: documents -> pieces of at most max_seq_len -> rows of at most `capacity` tokens.

A piece is a span of one document's input tokens; its targets are the next tokens of the same document,
so no target ever crosses a document boundary. Positions restart at 0 in every piece.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Piece:
    doc: int      # document id in the token store
    start: int    # first input token within the document
    length: int   # inputs doc[start:start+length], targets doc[start+1:start+length+1]


def cut_pieces(doc_ids: Sequence[int], doc_lengths: Sequence[int], max_seq_len: int) -> list[Piece]:
    """Each document of L tokens has L-1 (input, target) pairs, cut into pieces of at most max_seq_len."""
    pieces = []
    for doc, n_tokens in zip(doc_ids, doc_lengths):
        n_inputs = int(n_tokens) - 1
        for start in range(0, n_inputs, max_seq_len):
            pieces.append(Piece(int(doc), start, min(max_seq_len, n_inputs - start)))
    return pieces


def best_fit_decreasing(lengths: Sequence[int], capacity: int, order: Sequence[int] | None = None) -> list[list[int]]:
    """Bins of item indices, each summing to at most `capacity`.

    Items go longest first (ties in `order`, default index order) into the fullest bin that still fits
    them. Open bins are kept sorted by free space, so each placement is a binary search.
    """
    if any(n > capacity or n < 1 for n in lengths):
        bad = next(n for n in lengths if n > capacity or n < 1)
        raise ValueError(f"item of length {bad} cannot go in bins of capacity {capacity}")
    items = list(order) if order is not None else list(range(len(lengths)))
    items.sort(key=lambda i: -lengths[i])  # stable: ties keep `order`
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, bin index), sorted
    for i in items:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - n > 0:
            bisect.insort(free, (space - n, b))
    return bins


def fill_ratio(bins: Sequence[Sequence[int]], lengths: Sequence[int], capacity: int) -> float:
    """Useful tokens over the tokens the rows could hold."""
    if not bins:
        return 0.0
    used = sum(lengths[i] for b in bins for i in b)
    return used / (len(bins) * capacity)


def pack_epoch(pieces: Sequence[Piece], capacity: int, seed: int) -> list[list[Piece]]:
    """Rows for one epoch: ties shuffled before packing and rows shuffled after, both from `seed`."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pieces)).tolist()
    lengths = [p.length for p in pieces]
    bins = best_fit_decreasing(lengths, capacity, order)
    rows = [[pieces[i] for i in b] for b in bins]
    return [rows[i] for i in rng.permutation(len(rows))]


def materialize(row: Sequence[Piece], doc_tokens: Callable[[int], np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Token ids, targets and sequence lengths of one packed row."""
    ids, targets = [], []
    for p in row:
        d = doc_tokens(p.doc)
        ids.append(d[p.start:p.start + p.length])
        targets.append(d[p.start + 1:p.start + p.length + 1])
    return (np.concatenate(ids).astype(np.int64), np.concatenate(targets).astype(np.int64),
            [p.length for p in row])
