"""Attention over a paged KV cache (serving): write the new keys/values, attend over each whole context.

Same signature as the training backends; the batch is a PagedBatch carrying one layer's cache. The new
tokens of a sequence are the last seqlens[i] of its context_lens[i] tokens, so query j may see keys up to
context - new + j: a bottom-right-aligned causal mask (SDPA's is_causal is top-left, hence explicit unless
the chunk is the whole context).

Decoding sequences (one new token each) are batched: sorted by context length and cut into groups whose
lengths differ by at most 2x, each group runs as one SDPA call over its contexts gathered into a padded
(B, Hkv, L, D) block with a key-padding mask. Prefill chunks run one SDPA call each. Grouped-query heads
never copy keys and values H / Hkv times: decoding queries are grouped per kv head, prefill uses SDPA's
enable_gqa. The plan (groups, gather indices, masks) depends only on the step, so it is built once and
shared by every layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...batch import PagedBatch

GROUP_SPAN = 2.0  # a decode group's longest context is at most this many times its shortest


def _decode_group(batch: PagedBatch, members: list[int], q_starts: list[int], k_starts: list[int],
                  device: torch.device) -> tuple:
    """(query rows, (B, L) cache slots, (B, 1, 1, L) key mask or None) of a group of decoding sequences."""
    lens = [batch.context_lens[i] for i in members]
    L = max(lens)
    rows = torch.tensor([q_starts[i] for i in members], device=device)
    start = torch.tensor([k_starts[i] for i in members], device=device)[:, None]
    length = torch.tensor(lens, device=device)[:, None]
    ar = torch.arange(L, device=device)[None, :]
    valid = ar < length
    # Padding positions read the sequence's first key (any valid slot) and are masked out.
    slots = batch.context_slots[torch.where(valid, start + ar, start)]
    mask = None if min(lens) == L else valid[:, None, None, :]
    return rows, slots, mask


def _plan(batch: PagedBatch, device: torch.device) -> dict:
    if "paged_plan" in batch._plan:
        return batch._plan["paged_plan"]
    seqlens, ctxs = batch.seqlens, batch.context_lens
    q_starts, k_starts, q, k = [], [], 0, 0
    for n, ctx in zip(seqlens, ctxs):
        q_starts.append(q)
        k_starts.append(k)
        q, k = q + n, k + ctx
    decode = sorted((i for i, n in enumerate(seqlens) if n == 1), key=lambda i: -ctxs[i])
    groups, current = [], []
    for i in decode:
        if current and ctxs[current[0]] > GROUP_SPAN * ctxs[i]:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    prefill = []
    for i, (n, ctx) in enumerate(zip(seqlens, ctxs)):
        if n > 1:
            slots = batch.context_slots[k_starts[i]:k_starts[i] + ctx]
            mask = None
            if ctx != n:  # earlier tokens are cached: query j sees keys up to ctx - n + j
                q_pos = torch.arange(ctx - n, ctx, device=device)
                mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]  # (n, ctx)
            prefill.append((q_starts[i], n, slots, mask))
    plan = {"decode": [_decode_group(batch, g, q_starts, k_starts, device) for g in groups], "prefill": prefill}
    batch._plan["paged_plan"] = plan
    return plan


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype, scratch: dict | None,
            name: str) -> torch.Tensor:
    """cache rows at slots (any shape) -> slots.shape + (Hkv, D).

    index_select on the flat index (several times faster on CPU than advanced indexing with a 2-D index),
    into a buffer the runner keeps across steps when it passes one: a fresh multi-megabyte tensor per
    layer and step costs more in page faults (the kernel zeroing new pages) than the copy itself.
    """
    flat = slots.reshape(-1)
    row = cache.shape[1:]
    if scratch is None:
        rows = cache.index_select(0, flat)
    else:
        key = (name, cache.dtype, cache.device, tuple(row))
        buf = scratch.get(key)
        if buf is None or buf.shape[0] < flat.numel():
            buf = scratch[key] = torch.empty((max(flat.numel(), 2 * (0 if buf is None else buf.shape[0])), *row),
                                             dtype=cache.dtype, device=cache.device)
        rows = torch.index_select(cache, 0, flat, out=buf[:flat.numel()])
    return rows.view(*slots.shape, *row).to(dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PagedBatch) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) of the new tokens -> (T, H, D)."""
    batch.k_cache.index_copy_(0, batch.slot_mapping, k.to(batch.k_cache.dtype))
    batch.v_cache.index_copy_(0, batch.slot_mapping, v.to(batch.v_cache.dtype))
    hkv = k.shape[1]
    gqa = q.shape[1] != hkv
    plan = _plan(batch, q.device)
    scratch = batch._plan.get("paged_scratch")  # gather buffers reused across layers and steps (the runner's)
    if len(plan["prefill"]) == 1 and not plan["decode"]:
        out = None  # filled below as a whole
    else:
        out = torch.empty_like(q)
    for rows, slots, mask in plan["decode"]:
        keys = _gather(batch.k_cache, slots, q.dtype, scratch, "k").transpose(1, 2)   # (B, Hkv, L, D)
        values = _gather(batch.v_cache, slots, q.dtype, scratch, "v").transpose(1, 2)
        # One query per sequence: the H / Hkv query heads sharing a kv head become that head's query rows,
        # (B, Hkv, H / Hkv, D), so each key and value is read once per kv head rather than once per query head.
        qg = q[rows].view(len(rows), hkv, -1, q.shape[-1])
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        out[rows] = o.reshape(len(rows), -1, q.shape[-1])              # (B, H, D)
    for start, n, slots, mask in plan["prefill"]:
        qi = q[start:start + n].transpose(0, 1)[None]                  # (1, H, n, D)
        ki = _gather(batch.k_cache, slots, q.dtype, scratch, "k").transpose(0, 1)[None]  # (1, Hkv, ctx, D)
        vi = _gather(batch.v_cache, slots, q.dtype, scratch, "v").transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        if out is None:
            return o[0].transpose(0, 1)
        out[start:start + n] = o[0].transpose(0, 1)
    return out
