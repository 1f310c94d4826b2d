"""Scheduled requests -> one packed forward over the paged KV cache -> logits of each finished position."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..batch import PagedBatch
from ..config import ModelConfig
from ..model.attention import paged
from ..model.transformer import Transformer
from .compiled import StepRef
from .request import Request


def cache_layers(cfg: ModelConfig, heads: int) -> int:
    """Cache layers: the trunk's, plus one per MTP head that drafts when the heads attend ("block")."""
    return cfg.n_layer + (heads if cfg.mtp_head == "block" else 0)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, heads: int = 0) -> int:
    return 2 * cache_layers(cfg, heads) * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for(budget_bytes: float, cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                   heads: int = 0) -> int:
    return int(budget_bytes // (block_size * kv_bytes_per_token(cfg, dtype, heads)))


@dataclass
class SeqLogits:
    """One scheduled request's output at its last d + 1 positions: its last token and each of its d drafts
    (d = 0 outside speculative decoding); row i predicts the token after position i."""
    base: torch.Tensor                  # (d + 1, vocab) logits, float32 on CPU
    draft_states: torch.Tensor | None   # (d + 1, S, dim) when drafting: ModelRunner.draft_logits turns the
                                        # row a request drafts from into its heads' logits


class ModelRunner:
    """Owns the model and the KV cache tensors: (layers, num_blocks * block_size, Hkv, D) K and V.

    heads > 0 drafts with the model's first `heads` MTP heads; attending heads run in every forward (they need
    their own K/V at every position, so prefill chunks run them too) and keep cache layers after the trunk's."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, heads: int = 0, step_fn=None):
        self.model, self.block_size, self.heads = model, block_size, heads
        self.step_fn = step_fn  # compiled.CompiledStep, or None to run the model eagerly
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.cfg
        shape = (num_blocks * block_size, cfg.n_kv_head, cfg.head_dim)
        layers = cache_layers(cfg, heads)
        # One tensor for all layers (k_cache[i] is layer i's): a compiled decode step takes the cache whole.
        self.k_cache = torch.zeros((layers, *shape), dtype=self.dtype, device=self.device)
        self.v_cache = torch.zeros((layers, *shape), dtype=self.dtype, device=self.device)
        self.scratch: dict = {}  # attention's gather buffers, kept across steps (see paged._gather)

    @staticmethod
    def _new_ids(req: Request, start: int, end: int) -> list[int]:
        """Tokens [start, end) of the request followed by its drafts (positions num_tokens on), without
        building all_ids (a decode step needs only the last token)."""
        p, n = len(req.prompt_ids), req.num_tokens
        drafts = req.draft_ids[:max(0, end - n)]
        end = min(end, n)
        if start >= p:
            return req.output_ids[start - p:end - p] + drafts
        return req.all_ids[start:end] + drafts

    def prepare(self, scheduled: list[tuple[Request, int]]) -> tuple[torch.Tensor, PagedBatch]:
        """Token ids, positions, slot mapping and context slots of one step, all flat.

        Slots come from one (requests, blocks * block_size) grid of every scheduled request's block table,
        so the work per step is a few array operations rather than a Python loop over every context token.
        """
        bs = self.block_size
        ids: list[int] = []
        for req, n in scheduled:
            ids.extend(self._new_ids(req, req.num_computed, req.num_computed + n))
        seqlens = np.array([n for _, n in scheduled], dtype=np.int64)
        starts = np.array([req.num_computed for req, _ in scheduled], dtype=np.int64)
        ends = starts + seqlens
        width = max(len(req.block_table) for req, _ in scheduled)
        table = np.zeros((len(scheduled), width), dtype=np.int64)
        for r, (req, _) in enumerate(scheduled):
            table[r, :len(req.block_table)] = req.block_table
        grid = (table[:, :, None] * bs + np.arange(bs)).reshape(len(scheduled), width * bs)
        pos = np.arange(width * bs)[None, :]
        in_context = pos < ends[:, None]
        slots = grid[in_context & (pos >= starts[:, None])]   # row-major: request by request, in order
        context_slots = grid[in_context]
        cu_np = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(seqlens, out=cu_np[1:])
        positions = np.arange(int(cu_np[-1])) - np.repeat(cu_np[:-1] - starts, seqlens)
        dev = self.device
        cu = torch.from_numpy(cu_np.astype(np.int32))
        batch = PagedBatch(cu.to(dev), torch.from_numpy(positions).to(dev), int(seqlens.max()),
                           context_lens=ends.tolist(), slot_mapping=torch.from_numpy(slots).to(dev),
                           context_slots=torch.from_numpy(context_slots).to(dev),
                           k_cache=self.k_cache, v_cache=self.v_cache)
        batch._plan["seqlens"] = seqlens.tolist()
        batch._plan["paged_scratch"] = self.scratch
        return torch.tensor(ids, device=dev), batch

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Request, int]]) -> list[SeqLogits]:
        """Logits of every scheduled request at its last new position, and at each draft it runs."""
        ids, batch = self.prepare(scheduled)
        # A request runs d drafts when its tokens reach past num_tokens; a prefill chunk gets 1 row (unused).
        counts = np.array([max(1, req.num_computed + n - req.num_tokens + 1) for req, n in scheduled])
        ends = np.cumsum([n for _, n in scheduled])
        rows = np.repeat(ends - np.cumsum(counts), counts) + np.arange(int(counts.sum()))
        rows_t = torch.from_numpy(rows).to(self.device)
        # Decoding, or verifying the same number of drafts in every sequence: the graph of in-place attention.
        decode = paged.decode_inputs(batch, 1 + self.heads) if self.step_fn is not None else None
        if decode is not None:
            base, states, keys, values = self.step_fn.decode(ids, batch.positions, *decode, self.k_cache,
                                                             self.v_cache, self.heads)
            self.k_cache.index_copy_(1, batch.slot_mapping, keys.to(self.dtype))
            self.v_cache.index_copy_(1, batch.slot_mapping, values.to(self.dtype))
            if len(rows) < len(ids):  # a short prompt's prefill: its last token's row
                base, states = base[rows_t], None if states is None else states[rows_t]
        elif self.step_fn is not None:
            out = self.step_fn(ids, batch.positions, rows_t, StepRef(batch), self.heads)
            base, states = out if self.heads else (out, None)
        elif self.heads:
            base, states = self.model.logits_and_draft_states(ids, batch, rows_t, self.heads)
        else:
            base, states = self.model(ids, batch, rows=rows_t), None
        splits = counts.tolist()
        bases = base.float().cpu().split(splits)
        per_seq = states.split(splits) if states is not None else [None] * len(splits)
        return [SeqLogits(b, s) for b, s in zip(bases, per_seq)]

    @torch.inference_mode()
    def draft_logits(self, states: torch.Tensor) -> torch.Tensor:
        """(n, S, dim) rows of SeqLogits.draft_states -> (n, heads, vocab) logits, float32 on CPU: one call for
        all the rows the step's requests draft from."""
        if self.step_fn is not None:
            return self.step_fn.drafts(states, self.heads).float().cpu()
        return self.model.draft_logits(states, self.heads).float().cpu()
