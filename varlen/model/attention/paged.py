"""Attention over a paged KV cache (serving): write the new keys/values, attend over each whole context.

Same signature as the training backends; the batch is a PagedBatch carrying one layer's cache. The new
tokens of a sequence are the last seqlens[i] of its context_lens[i] tokens, so query j may see keys up to
context - new + j: a bottom-right-aligned causal mask (SDPA's is_causal is top-left, hence explicit unless
the chunk is the whole context).

Decoding sequences (one new token each) are batched: sorted by context length and cut into groups whose
lengths differ by at most 2x, each group runs as one SDPA call over its contexts gathered into a padded
(B, Hkv, L, D) block with a key-padding mask. Sequences with a few new tokens after a cached context (a
speculative verify: the last token and its drafts) are batched the same way, per token count, with a
causal mask on top. Prefill chunks run one SDPA call each. Grouped-query heads
never copy keys and values H / Hkv times: decoding queries are grouped per kv head, prefill uses SDPA's
enable_gqa. The plan (groups, gather indices, masks) depends only on the step, so it is built once and
shared by every layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...batch import PagedBatch

GROUP_SPAN = 2.0  # a decode group's longest context is at most this many times its shortest
MAX_GROUP_QUERIES = 8  # sequences with at most this many new tokens after a cached context are batched
# A compiled decode step pads every context to the longest; past this many padded keys per real one, the
# eager length groups cost less (the in-graph attention computes on padding, ~1/3 the cost per key here).
DECODE_PADDING = 3.0


def _is_grouped(n: int, ctx: int) -> bool:
    return n == 1 or n <= MAX_GROUP_QUERIES and ctx > n


def _decode_group(batch: PagedBatch, members: list[int], q_starts: list[int], k_starts: list[int],
                  device: torch.device, per_kv: int) -> tuple:
    """(query rows (B * n,), (B, L) cache slots, key mask or None, n) of a group of sequences with n new
    tokens each; the mask is (B, 1, 1, L) for n = 1, else (B, 1, n * per_kv, L) in the query layout below."""
    n = batch.seqlens[members[0]]
    lens = [batch.context_lens[i] for i in members]
    L = max(lens)
    rows = torch.tensor([q_starts[i] + j for i in members for j in range(n)], device=device)
    start = torch.tensor([k_starts[i] for i in members], device=device)[:, None]
    length = torch.tensor(lens, device=device)[:, None]
    ar = torch.arange(L, device=device)[None, :]
    valid = ar < length
    # Padding positions read the sequence's first key (any valid slot) and are masked out.
    slots = batch.context_slots[torch.where(valid, start + ar, start)]
    if n == 1:
        mask = None if min(lens) == L else valid[:, None, None, :]
    else:
        # New token j sees keys up to ctx - n + j (bottom-right causal; never padding); each of its per_kv
        # query heads gets its row.
        last = length - n + torch.arange(n, device=device)[None, :]        # (B, n)
        mask = ar[:, None, :] <= last[:, :, None]                            # (B, n, L)
        mask = mask.repeat_interleave(per_kv, dim=1)[:, None]               # (B, 1, n * per_kv, L)
    return rows, slots, mask, n


def _plan(batch: PagedBatch, device: torch.device, per_kv: int) -> dict:
    if "paged_plan" in batch._plan:
        return batch._plan["paged_plan"]
    seqlens, ctxs = batch.seqlens, batch.context_lens
    q_starts, k_starts, q, k = [], [], 0, 0
    for n, ctx in zip(seqlens, ctxs):
        q_starts.append(q)
        k_starts.append(k)
        q, k = q + n, k + ctx
    decode = sorted((i for i, (n, ctx) in enumerate(zip(seqlens, ctxs)) if _is_grouped(n, ctx)),
                    key=lambda i: (seqlens[i], -ctxs[i]))
    groups, current = [], []
    for i in decode:
        if current and (seqlens[current[0]] != seqlens[i] or ctxs[current[0]] > GROUP_SPAN * ctxs[i]):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    prefill = []
    for i, (n, ctx) in enumerate(zip(seqlens, ctxs)):
        if not _is_grouped(n, ctx):
            slots = batch.context_slots[k_starts[i]:k_starts[i] + ctx]
            mask = None
            if ctx != n:  # earlier tokens are cached: query j sees keys up to ctx - n + j
                q_pos = torch.arange(ctx - n, ctx, device=device)
                mask = torch.arange(ctx, device=device)[None, :] <= q_pos[:, None]  # (n, ctx)
            prefill.append((q_starts[i], n, slots, mask))
    decode = [_decode_group(batch, g, q_starts, k_starts, device, per_kv) for g in groups]
    if len(groups) == 1 and not prefill and groups[0] == sorted(groups[0]):
        # One group holding every query in stream order (always so at batch 1): no gather or scatter of rows.
        decode = [(None, *decode[0][1:])]
    plan = {"decode": decode, "prefill": prefill}
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
    plan = _plan(batch, q.device, q.shape[1] // hkv)
    scratch = batch._plan.get("paged_scratch")  # gather buffers reused across layers and steps (the runner's)
    if len(plan["prefill"]) == 1 and not plan["decode"] or plan["decode"] and plan["decode"][0][0] is None:
        out = None  # filled below as a whole
    else:
        out = torch.empty_like(q)
    d = q.shape[-1]
    for rows, slots, mask, n in plan["decode"]:
        keys = _gather(batch.k_cache, slots, q.dtype, scratch, "k").transpose(1, 2)   # (B, Hkv, L, D)
        values = _gather(batch.v_cache, slots, q.dtype, scratch, "v").transpose(1, 2)
        B = slots.shape[0]
        # The H / Hkv query heads sharing a kv head (of each of the n new tokens) become that head's query
        # rows, (B, Hkv, n * H / Hkv, D), so each key and value is read once per kv head, not per query head.
        qg = (q if rows is None else q[rows]).view(B, n, hkv, -1, d)
        qg = qg.view(B, hkv, -1, d) if n == 1 else qg.transpose(1, 2).reshape(B, hkv, -1, d)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
        if n > 1:
            o = o.view(B, hkv, n, -1, d).transpose(1, 2)               # (B, n, Hkv, H / Hkv, D)
        if rows is None:
            return o.reshape(B * n, -1, d)                             # (B * n, H, D)
        out[rows] = o.reshape(B * n, -1, d)
    for start, n, slots, mask in plan["prefill"]:
        qi = q[start:start + n].transpose(0, 1)[None]                  # (1, H, n, D)
        ki = _gather(batch.k_cache, slots, q.dtype, scratch, "k").transpose(0, 1)[None]  # (1, Hkv, ctx, D)
        vi = _gather(batch.v_cache, slots, q.dtype, scratch, "v").transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        if out is None:
            return o[0].transpose(0, 1)
        out[start:start + n] = o[0].transpose(0, 1)
    return out


def decode_inputs(batch: PagedBatch, max_query: int = 1, min_keys: int = 2,
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What a compiled decode step attends with, when every sequence of the step runs the same number Q <=
    max_query of new tokens (1 for decoding; 1 + drafts when verifying speculative drafts) and, padded to the
    longest, their contexts hold at most DECODE_PADDING keys per real one; else None.

    (slots, mask): slots (B, L) are the cache slots of each sequence's earlier tokens, L = the longest such
    context (at least `min_keys`: a compiler specialises a length of 1), padding reading the sequence's first
    slot, which mask (B, L) marks False. The new tokens' own keys are not in the cache yet (the caller writes
    them after the step) and are attended causally among themselves. A prompt of Q tokens has no cached token:
    its row is all padding."""
    seqlens, ctxs = batch.seqlens, batch.context_lens
    q = seqlens[0]
    if not 1 <= q <= max_query or any(n != q for n in seqlens) or len(ctxs) * max(ctxs) > DECODE_PADDING * sum(ctxs):
        return None
    device = batch.context_slots.device
    before = torch.tensor(ctxs, device=device)[:, None] - q                    # (B, 1) cached tokens
    start = torch.cumsum(torch.tensor([0] + ctxs[:-1], device=device), 0)[:, None]
    L = max(min_keys, max(ctxs) - q)
    ar = torch.arange(L, device=device)[None, :]
    valid = ar < before
    slots = batch.context_slots[torch.where(valid, start + ar, start)]
    return slots, valid
