"""Scheduled requests -> one packed forward over the paged KV cache -> logits of each finished position."""
from __future__ import annotations

import numpy as np
import torch

from ..batch import PagedBatch
from ..config import ModelConfig
from ..model.transformer import Transformer
from .request import Request


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for(budget_bytes: float, cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    return int(budget_bytes // (block_size * kv_bytes_per_token(cfg, dtype)))


class ModelRunner:
    """Owns the model and the KV cache tensors: one (num_blocks * block_size, Hkv, D) K and V per layer."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int):
        self.model, self.block_size = model, block_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cfg = model.cfg
        shape = (num_blocks * block_size, cfg.n_kv_head, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.n_layer)]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(cfg.n_layer)]
        self.scratch: dict = {}  # attention's gather buffers, kept across steps (see paged._gather)

    @staticmethod
    def _new_ids(req: Request, start: int, end: int) -> list[int]:
        """req.all_ids[start:end] without building all_ids (a decode step needs only the last token)."""
        p = len(req.prompt_ids)
        if start >= p:
            return req.output_ids[start - p:end - p]
        return req.all_ids[start:end]

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
    def run(self, scheduled: list[tuple[Request, int]]) -> torch.Tensor:
        """Logits (n, vocab), float32 on CPU, at the last new position of every scheduled request."""
        ids, batch = self.prepare(scheduled)
        last = batch.cu_seqlens[1:].long() - 1
        return self.model(ids, batch, rows=last).float().cpu()
