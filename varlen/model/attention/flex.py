"""FlexAttention with a document-causal block mask: fused and block-sparse when compiled (CUDA)."""
from __future__ import annotations

import torch

from ...batch import Batch


def is_available(device: torch.device) -> bool:
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    # Off CUDA it has no backward (checked on torch 2.13 CPU), so training cannot use it there.
    return device.type == "cuda"


def _compiled():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) -> (T, H, D)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    T, H, _ = q.shape
    plan = batch._plan
    if "flex_mask" not in plan:
        seq_id = torch.repeat_interleave(torch.arange(len(batch.seqlens), device=q.device),
                                         torch.tensor(batch.seqlens, device=q.device))

        def doc_causal(b, h, q_idx, kv_idx):
            return (seq_id[q_idx] == seq_id[kv_idx]) & (kv_idx <= q_idx)

        plan["flex_mask"] = create_block_mask(doc_causal, None, None, T, T, device=q.device)
        plan["flex_fn"] = _compiled() if q.device.type == "cuda" else flex_attention
    fn = plan["flex_fn"]
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
             block_mask=plan["flex_mask"], enable_gqa=k.shape[1] != H)
    return out[0].transpose(0, 1)
