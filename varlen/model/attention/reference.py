"""Plain attention with an explicit (T, T) document-causal mask. O(T^2) memory: for tests only."""
from __future__ import annotations

import math

import torch

from ...batch import Batch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) -> (T, H, D); token i sees token j iff same sequence and j <= i."""
    T, H, D = q.shape
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    seq_id = torch.repeat_interleave(torch.arange(len(batch.seqlens), device=q.device),
                                     torch.tensor(batch.seqlens, device=q.device))
    idx = torch.arange(T, device=q.device)
    allowed = (seq_id[:, None] == seq_id[None, :]) & (idx[None, :] <= idx[:, None])  # (T, T)
    scores = torch.einsum("thd,shd->hts", q.float(), k.float()) / math.sqrt(D)  # (H, T, T)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("hts,shd->thd", scores.softmax(-1), v.float())
    return out.to(q.dtype)
