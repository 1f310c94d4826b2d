"""flash-attn's varlen kernel: the packed stream and cu_seqlens go straight in (CUDA, fp16/bf16)."""
from __future__ import annotations

import torch

from ...batch import Batch


def is_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
    """q (T, H, D), k/v (T, Hkv, D) -> (T, H, D); the kernel handles grouped-query heads itself."""
    from flash_attn import flash_attn_varlen_func
    cu = batch.cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(q, k, v, cu, cu, batch.max_seqlen, batch.max_seqlen, causal=True)
