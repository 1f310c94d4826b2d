"""Scheduled requests -> one packed forward over the paged KV cache -> logits of each finished position."""
from __future__ import annotations

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

    def _slots(self, req: Request, start: int, end: int) -> list[int]:
        bs, table = self.block_size, req.block_table
        return [table[t // bs] * bs + t % bs for t in range(start, end)]

    def prepare(self, scheduled: list[tuple[Request, int]]) -> tuple[torch.Tensor, PagedBatch]:
        """Token ids, positions, slot mapping and context slots of one step, all flat."""
        ids, positions, slots, context_slots, seqlens, context_lens = [], [], [], [], [], []
        for req, n in scheduled:
            start, end = req.num_computed, req.num_computed + n
            ids.extend(req.all_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slots(req, start, end))
            context_slots.extend(self._slots(req, 0, end))
            seqlens.append(n)
            context_lens.append(end)
        dev = self.device
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
        batch = PagedBatch(cu.to(dev), torch.tensor(positions, device=dev), max(seqlens),
                           context_lens=context_lens, slot_mapping=torch.tensor(slots, device=dev),
                           context_slots=torch.tensor(context_slots, device=dev),
                           k_cache=self.k_cache, v_cache=self.v_cache)
        return torch.tensor(ids, device=dev), batch

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Request, int]]) -> torch.Tensor:
        """Logits (n, vocab), float32 on CPU, at the last new position of every scheduled request."""
        ids, batch = self.prepare(scheduled)
        last = batch.cu_seqlens[1:].long() - 1
        return self.model(ids, batch, rows=last).float().cpu()
