"""Attention backends, one signature: attention(q (T,H,D), k (T,Hkv,D), v (T,Hkv,D), batch) -> (T,H,D)."""
from __future__ import annotations

from typing import Callable

import torch

from ...batch import Batch
from . import flash, flex, reference, sdpa_docs

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Batch], torch.Tensor]

BACKENDS: dict[str, AttentionFn] = {
    "sdpa_docs": sdpa_docs.attention,
    "flex": flex.attention,
    "flash": flash.attention,
    "reference": reference.attention,
}


def choose_backend(name: str, device: torch.device) -> str:
    """`auto` picks the fastest backend that trains on this device; an explicit name is honoured."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; use auto, {', '.join(BACKENDS)}")
        if name == "flash" and not flash.is_available(device):
            raise ValueError("attention backend 'flash' needs CUDA and the flash-attn package; use --model.attention auto")
        return name
    if flash.is_available(device):
        return "flash"
    if flex.is_available(device):
        return "flex"
    return "sdpa_docs"


def get_attention(name: str) -> AttentionFn:
    return BACKENDS[name]
