"""One process's stream of optimizer steps, each a list of packed micro-batches; resumable exactly."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..batch import Batch
from .pack import Piece, cut_pieces, fill_ratio, materialize, pack_epoch
from .corpus import CorpusError
from .tokens import TokenStore


@dataclass
class MicroBatch:
    ids: torch.Tensor       # (T,) int64
    targets: torch.Tensor   # (T,) int64, same document as the input at every position
    batch: Batch

    @property
    def num_targets(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(self.ids.to(device), self.targets.to(device), self.batch.to(device))


def step_layout(tokens_per_step: int, max_seq_len: int, grad_accum: int = 1, row_tokens: int = 0) -> tuple[int, int]:
    """(rows per optimizer step, tokens per row) for a step of `tokens_per_step` tokens.

    Rows are capped at `row_tokens` (never below max_seq_len, which one piece may fill) because one huge
    row is slower than the same tokens as several accumulated rows on CPU: activations of a 64k-token row
    leave the caches and page-fault on every layer.
    """
    rows = max(grad_accum, 1)
    if row_tokens > 0:
        cap = max(row_tokens, max_seq_len)
        rows = max(rows, min(-(-tokens_per_step // cap), tokens_per_step // max_seq_len))
    return rows, tokens_per_step // rows


def make_micro(store: TokenStore, row: list[Piece]) -> MicroBatch:
    ids, targets, seqlens = materialize(row, store.doc)
    return MicroBatch(torch.from_numpy(ids), torch.from_numpy(targets), Batch.from_seqlens(seqlens))


class PackedLoader:
    """Rows of at most `capacity` tokens; `grad_accum` rows make one optimizer step.

    Epoch e is packed from seed + e, so (epoch, step) alone pins the data position for exact resume.
    Rows left over at the end of an epoch (fewer than grad_accum) are dropped for that epoch only.
    """

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, capacity: int, max_seq_len: int,
                 seed: int, grad_accum: int = 1):
        self.store, self.capacity, self.seed, self.grad_accum = store, capacity, seed, grad_accum
        self.pieces = cut_pieces(doc_ids, store.lengths[doc_ids], max_seq_len)
        if not self.pieces:
            raise CorpusError("the training split has no documents with at least two tokens")
        self.epoch, self.step = 0, 0
        self._rows: list[list[Piece]] | None = None
        if self.steps_per_epoch < 1:
            raise CorpusError(f"the training split holds {sum(p.length for p in self.pieces)} tokens, too few to "
                             f"fill one step of {grad_accum} x {capacity}; lower --data.tokens_per_step")

    def rows(self) -> list[list[Piece]]:
        if self._rows is None:
            self._rows = pack_epoch(self.pieces, self.capacity, self.seed + self.epoch)
        return self._rows

    @property
    def steps_per_epoch(self) -> int:
        return len(self.rows()) // self.grad_accum

    def fill_ratio(self) -> float:
        rows = self.rows()
        lengths = [p.length for r in rows for p in r]
        idx, k = [], 0
        for r in rows:
            idx.append(list(range(k, k + len(r))))
            k += len(r)
        return fill_ratio(idx, lengths, self.capacity)

    def next_step(self) -> list[MicroBatch]:
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._rows = self.epoch + 1, 0, None
        rows = self.rows()[self.step * self.grad_accum:(self.step + 1) * self.grad_accum]
        self.step += 1
        return [make_micro(self.store, r) for r in rows]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self._rows = int(state["epoch"]), int(state["step"]), None


def validation_micros(store: TokenStore, doc_ids: np.ndarray, capacity: int, max_seq_len: int,
                      max_tokens: int) -> list[MicroBatch]:
    """A fixed validation set: pieces of the split in a fixed random order, up to max_tokens targets.

    Random pieces rather than the first documents, so one huge file cannot be the whole set.
    """
    pieces = cut_pieces(doc_ids, store.lengths[doc_ids], max_seq_len)
    chosen, total = [], 0
    for i in np.random.default_rng(0).permutation(len(pieces)):
        p = pieces[i]
        if total >= max_tokens:
            break
        chosen.append(p)
        total += p.length
    if not chosen:
        return []
    return [make_micro(store, r) for r in pack_epoch(chosen, capacity, seed=0)]
