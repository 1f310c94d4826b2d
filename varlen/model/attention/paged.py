"""Attention over a paged KV cache (serving): write the new keys/values, attend over each whole context.

Same signature as the training backends; the batch is a PagedBatch carrying one layer's cache. The new
tokens of a sequence are the last seqlens[i] of its context_lens[i] tokens, so query j may see keys up to
context - new + j: a bottom-right-aligned causal mask (SDPA's is_causal is top-left, hence explicit).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...batch import PagedBatch


def _mask(batch: PagedBatch, i: int, n: int, ctx: int, device: torch.device) -> torch.Tensor | None:
    if n == 1:
        return None  # one query sees the whole context
    key = ("paged_mask", i)
    if key not in batch._plan:  # shared by every layer of this step
        q_pos = torch.arange(ctx - n, ctx, device=device)
        batch._plan[key] = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]  # (n, ctx)
    return batch._plan[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) of the new tokens -> (T, H, D)."""
    batch.k_cache.index_copy_(0, batch.slot_mapping, k.to(batch.k_cache.dtype))
    batch.v_cache.index_copy_(0, batch.slot_mapping, v.to(batch.v_cache.dtype))
    H, Hkv = q.shape[1], k.shape[1]
    keys = batch.k_cache[batch.context_slots]    # (sum ctx, Hkv, D)
    values = batch.v_cache[batch.context_slots]
    if H != Hkv:
        keys, values = keys.repeat_interleave(H // Hkv, dim=1), values.repeat_interleave(H // Hkv, dim=1)
    out = torch.empty_like(q)
    q_start, k_start = 0, 0
    for i, (n, ctx) in enumerate(zip(batch.seqlens, batch.context_lens)):
        qi = q[q_start:q_start + n].transpose(0, 1)[None]              # (1, H, n, D)
        ki = keys[k_start:k_start + ctx].transpose(0, 1)[None]         # (1, H, ctx, D)
        vi = values[k_start:k_start + ctx].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qi, ki.to(q.dtype), vi.to(q.dtype),
                                           attn_mask=_mask(batch, i, n, ctx, q.device))
        out[q_start:q_start + n] = o[0].transpose(0, 1)
        q_start, k_start = q_start + n, k_start + ctx
    return out
