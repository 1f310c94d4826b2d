"""One process's stream of optimizer steps, each a list of packed micro-batches; resumable exactly."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..batch import Batch
from ..config import DataConfig
from .decompose import bucket_steps, check_range, decompose, schedule, step_chunks
from .pack import Piece, best_fit_decreasing, cut_pieces, materialize, pack_epoch
from .corpus import CorpusError
from .tokens import TokenStore


IGNORE = -100  # target of a padding position: no loss


@dataclass
class MicroBatch:
    ids: torch.Tensor       # (T,) int64
    targets: torch.Tensor   # (T,) int64, same document as the input at every position
    batch: Batch
    group: Any = None       # a sequence-parallel process group whose ranks train this row together (None: alone)

    @property
    def num_targets(self) -> int:
        """Positions with a loss (padding has none)."""
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device | str) -> "MicroBatch":
        return MicroBatch(self.ids.to(device), self.targets.to(device), self.batch.to(device), self.group)


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


class StepLoader:
    """Optimizer steps, each a list of micro-batches, planned one epoch at a time from seed + epoch alone,
    so (epoch, step) pins the data position for exact resume. Subclasses say how an epoch is cut."""

    def __init__(self, store: TokenStore, seed: int):
        self.store, self.seed = store, seed
        self.epoch, self.step = 0, 0
        self._plan: list[list] | None = None

    def plan_epoch(self, epoch: int) -> list[list]:
        """Steps of the epoch; each a list of micro-batch specs that make_batch turns into tensors."""
        raise NotImplementedError

    def make_batch(self, spec) -> MicroBatch:
        raise NotImplementedError

    def plan(self) -> list[list]:
        if self._plan is None:
            self._plan = self.plan_epoch(self.epoch)
        return self._plan

    @property
    def steps_per_epoch(self) -> int:
        return len(self.plan())

    def _check_fills_a_step(self, what: str) -> None:
        if self.steps_per_epoch < 1:
            raise CorpusError(f"the training split is too small to fill one optimizer step of {what}; lower "
                              f"--data.tokens_per_step or use a bigger corpus")

    def fill_ratio(self) -> float:
        """Useful (target) tokens over computed tokens in the first epoch's steps."""
        useful = computed = 0
        for step in self.plan()[:200]:
            for spec in step:
                m = self.make_batch(spec)
                useful += m.num_targets
                computed += int(m.targets.numel())
        return useful / max(computed, 1)

    def next_specs(self) -> list:
        """The next optimizer step's micro-batch specs (advances the position)."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step, self._plan = self.epoch + 1, 0, None
        specs = self.plan()[self.step]
        self.step += 1
        return specs

    def next_step(self) -> list[MicroBatch]:
        return [self.make_batch(s) for s in self.next_specs()]

    # A step's specs are lists of sequences (pieces, chunks or windows). Data-parallel ranks share out
    # the sequences of one step and pack each share into rows of their own.
    def seq_length(self, seq) -> int:
        """Tokens of one sequence of a step; each has as many targets."""
        return seq.length

    def rows_of(self, seqs: list, capacity: int = 0) -> list:
        """Micro-batch specs holding `seqs` (one rank's share of a step, or a sequence-parallel group's), rows
        of at most `capacity` tokens (default the loader's)."""
        bins = best_fit_decreasing([self.seq_length(q) for q in seqs], capacity or self.capacity)
        return [[seqs[k] for k in sorted(b)] for b in bins]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self._plan = int(state["epoch"]), int(state["step"]), None


class PackedLoader(StepLoader):
    """Rows of at most `capacity` tokens packed best-fit; `grad_accum` rows make one optimizer step.
    Rows left over at the end of an epoch (fewer than grad_accum) are dropped for that epoch only."""

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, capacity: int, max_seq_len: int,
                 seed: int, grad_accum: int = 1):
        super().__init__(store, seed)
        self.capacity, self.grad_accum = capacity, grad_accum
        self.pieces = cut_pieces(doc_ids, store.lengths[doc_ids], max_seq_len)
        if not self.pieces:
            raise CorpusError("the training split has no documents with at least two tokens")
        self._check_fills_a_step(f"{grad_accum} x {capacity} tokens")

    def plan_epoch(self, epoch: int) -> list[list]:
        rows = pack_epoch(self.pieces, self.capacity, self.seed + epoch)
        g = self.grad_accum
        return [rows[i * g:(i + 1) * g] for i in range(len(rows) // g)]

    def make_batch(self, spec: list[Piece]) -> MicroBatch:
        return make_micro(self.store, spec)

    def fill_ratio(self) -> float:  # rows hold no padding: the share of each row's capacity in use
        rows = [r for step in self.plan() for r in step]
        return sum(p.length for r in rows for p in r) / max(len(rows) * self.capacity, 1)


class DDLoader(StepLoader):
    """Dataset Decomposition: each step draws one bucket (the curriculum's choice, the same on every
    rank) and takes tokens_per_step / 2^i of its chunks, run as rows of at most `capacity` tokens."""

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, tokens_per_step: int, capacity: int, seed: int,
                 lo: int, hi: int, curriculum: str, cycles: int = 1, keep_short: bool = False):
        super().__init__(store, seed)
        check_range(lo, hi, tokens_per_step)
        # Rows stay at the configured cap (row_tokens) unless a bucket's chunk is longer: a step of short
        # chunks in rows as long as the longest bucket runs ~20% slower on CPU (measured in
        # benchmarks/dd_vs_concat.py), for the reason row_tokens exists at all.
        self.tokens_per_step, self.row_cap, self.capacity = tokens_per_step, capacity, max(capacity, 2 ** hi)
        self.curriculum, self.cycles = curriculum, cycles
        self.dec = decompose(doc_ids, store.lengths[doc_ids], lo, hi, keep_short)
        self.steps = bucket_steps(self.dec, tokens_per_step)
        schedule({}, curriculum, 0, cycles)  # a bad curriculum or cycle count fails here, not mid-run
        self._check_fills_a_step(f"{tokens_per_step} tokens from one bucket")

    def plan_epoch(self, epoch: int) -> list[list]:
        order = schedule(self.steps, self.curriculum, self.seed + epoch, self.cycles)
        steps = []
        for chunks in step_chunks(self.dec, order, self.tokens_per_step, self.seed + epoch):
            cap = max(self.row_cap, max(c.length for c in chunks))
            rows, row, used = [], [], 0
            for c in chunks:
                if used + c.length > cap:
                    rows.append(row)
                    row, used = [], 0
                row.append(c)
                used += c.length
            steps.append(rows + [row])
        return steps

    def rows_of(self, seqs: list, capacity: int = 0) -> list:
        cap = capacity or max([self.row_cap] + [q.length for q in seqs])
        bins = best_fit_decreasing([q.length for q in seqs], cap)
        return [[seqs[k] for k in sorted(b)] for b in bins]

    def make_batch(self, spec: list[Piece]) -> MicroBatch:
        return make_micro(self.store, spec)


class ConcatChunkLoader(StepLoader):
    """The usual baseline: the epoch's documents concatenated in a shuffled order and cut into windows of
    max_seq_len, attended as one causal sequence each, across document boundaries."""

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, tokens_per_step: int, capacity: int,
                 max_seq_len: int, seed: int):
        super().__init__(store, seed)
        self.doc_ids, self.max_seq_len = np.asarray(doc_ids), max_seq_len
        self.per_step = max(1, tokens_per_step // max_seq_len)
        self.per_row = max(1, capacity // max_seq_len)
        self._stream: tuple[int, np.ndarray, np.ndarray] | None = None
        self._check_fills_a_step(f"{self.per_step} windows of {max_seq_len} tokens")

    def _epoch_stream(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._stream is None or self._stream[0] != epoch:
            order = self.doc_ids[np.random.default_rng(self.seed + epoch).permutation(len(self.doc_ids))]
            starts = np.concatenate([[0], np.cumsum(self.store.lengths[order])])
            self._stream = (epoch, order, starts)
        return self._stream[1], self._stream[2]

    def plan_epoch(self, epoch: int) -> list[list]:
        _, starts = self._epoch_stream(epoch)
        n_windows = (int(starts[-1]) - 1) // self.max_seq_len
        # Windows in a shuffled order, as the usual baseline draws them: consecutive windows would fill a
        # step from one or two long documents and make its gradient needlessly correlated.
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(n_windows)
        windows = [(epoch, int(w) * self.max_seq_len) for w in order]
        steps = [windows[i * self.per_step:(i + 1) * self.per_step] for i in range(n_windows // self.per_step)]
        return [[s[j:j + self.per_row] for j in range(0, len(s), self.per_row)] for s in steps]

    def seq_length(self, seq: tuple[int, int]) -> int:
        return self.max_seq_len

    def rows_of(self, seqs: list, capacity: int = 0) -> list:
        # windows of max_seq_len, per_row to a row: the shape is fixed, a capacity changes nothing
        return [seqs[j:j + self.per_row] for j in range(0, len(seqs), self.per_row)]

    def _tokens(self, epoch: int, start: int, n: int) -> np.ndarray:
        order, starts = self._epoch_stream(epoch)
        out, k = [], int(np.searchsorted(starts, start, side="right")) - 1
        while n > 0:
            d = self.store.doc(int(order[k]))
            piece = d[start - int(starts[k]):][:n]
            out.append(piece)
            n -= len(piece)
            start += len(piece)
            k += 1
        return np.concatenate(out).astype(np.int64)

    def make_batch(self, spec: list[tuple[int, int]]) -> MicroBatch:
        L = self.max_seq_len
        windows = [self._tokens(epoch, start, L + 1) for epoch, start in spec]
        ids = np.concatenate([w[:-1] for w in windows])
        targets = np.concatenate([w[1:] for w in windows])
        return MicroBatch(torch.from_numpy(ids), torch.from_numpy(targets), Batch.from_seqlens([L] * len(windows)))


class PadLoader(StepLoader):
    """Pad-to-longest: pieces in a shuffled order, as many per step as fit tokens_per_step useful tokens,
    each micro-batch padded to its longest piece (pad positions carry no loss)."""

    def __init__(self, store: TokenStore, doc_ids: np.ndarray, tokens_per_step: int, capacity: int,
                 max_seq_len: int, seed: int):
        super().__init__(store, seed)
        self.tokens_per_step, self.capacity = tokens_per_step, capacity
        self.pieces = cut_pieces(doc_ids, store.lengths[doc_ids], max_seq_len)
        self._check_fills_a_step(f"{tokens_per_step} tokens")

    def plan_epoch(self, epoch: int) -> list[list]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.pieces))
        steps, step, used = [], [], 0
        for i in order:
            p = self.pieces[i]
            if used + p.length > self.tokens_per_step and step:
                steps.append(step)
                step, used = [], 0
            step.append(p)
            used += p.length
        return [self._rows(s) for s in steps]  # the epoch's last, partial step is dropped

    def _rows(self, step: list[Piece]) -> list[list[Piece]]:
        """Micro-batches of at most `capacity` padded tokens, in step order."""
        rows, row = [], []
        for p in step:
            longest = max([q.length for q in row] + [p.length])
            if row and longest * (len(row) + 1) > self.capacity:
                rows.append(row)
                row = []
            row.append(p)
        return rows + [row]

    def rows_of(self, seqs: list, capacity: int = 0) -> list:
        # padded rows follow the step's token budget; sequence parallelism (the only caller of capacity) refuses pad
        return self._rows(seqs) if seqs else []

    def make_batch(self, spec: list[Piece]) -> MicroBatch:
        L = max(p.length for p in spec)
        ids = np.full(L * len(spec), self.store.doc(spec[0].doc)[0], dtype=np.int64)  # a frame token as pad
        targets = np.full(L * len(spec), IGNORE, dtype=np.int64)
        for k, p in enumerate(spec):
            d = self.store.doc(p.doc)
            ids[k * L:k * L + p.length] = d[p.start:p.start + p.length]
            targets[k * L:k * L + p.length] = d[p.start + 1:p.start + p.length + 1]
        return MicroBatch(torch.from_numpy(ids), torch.from_numpy(targets), Batch.from_seqlens([L] * len(spec)))


def make_loader(data: DataConfig, max_seq_len: int, grad_accum: int, store: TokenStore, doc_ids: np.ndarray,
                seed: int) -> StepLoader:
    """The training loader that --data.batching names, each over the same documents and tokens per step."""
    rows, capacity = step_layout(data.tokens_per_step, max_seq_len, grad_accum, data.row_tokens)
    if data.batching == "pack":
        return PackedLoader(store, doc_ids, capacity, max_seq_len, seed, rows)
    if data.batching == "dd":
        hi = data.dd_hi or max_seq_len.bit_length() - 1
        # DD's rows follow row_tokens itself, not raised to max_seq_len: only the long buckets need that.
        row_cap = min(data.row_tokens, capacity) if data.row_tokens > 0 else capacity
        return DDLoader(store, doc_ids, data.tokens_per_step, row_cap, seed, data.dd_lo, hi, data.curriculum,
                        data.dd_cycles, data.dd_keep_short)
    if data.batching == "concat_chunk":
        return ConcatChunkLoader(store, doc_ids, data.tokens_per_step, capacity, max_seq_len, seed)
    if data.batching == "pad":
        return PadLoader(store, doc_ids, data.tokens_per_step, capacity, max_seq_len, seed)
    raise ValueError(f"data.batching {data.batching!r} unknown; use pack, dd, concat_chunk or pad")


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
