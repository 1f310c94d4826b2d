"""SDPA per group of equal-length sequences: no padding, no (T, T) mask, backward on every device.

Sequences of one length are stacked into one (n, H, L, D) causal SDPA call; the groups share a single
gather/scatter permutation computed once per batch, so each layer pays len(groups) kernel calls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...batch import Batch


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) -> (T, H, D), causal within each sequence of `batch`."""
    T, H, D = q.shape
    rep = H // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if len(batch.seqlens) == 1:
        out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        return out.transpose(0, 1)  # (T, H, D)
    perm, groups = batch.length_groups()
    qp, kp, vp = q[perm], k[perm], v[perm]
    outs, off = [], 0
    for count, length in groups:
        n = count * length
        def view(x: torch.Tensor) -> torch.Tensor:
            return x[off:off + n].view(count, length, H, D).transpose(1, 2)  # (count, H, L, D)
        o = F.scaled_dot_product_attention(view(qp), view(kp), view(vp), is_causal=True)
        outs.append(o.transpose(1, 2).reshape(n, H, D))
        off += n
    return torch.cat(outs)[batch.inverse_perm()]
