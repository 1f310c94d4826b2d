"""Checkpoints on disk: varlen's own (io) and Hugging Face Llama directories (hf_llama)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..data.tokenizer import TextTokenizer
from ..model.transformer import Transformer
from . import hf_llama, io


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Config, TextTokenizer]:
    """Model (eval mode), config and tokenizer from a varlen run or checkpoint dir, or a HF Llama dir."""
    if hf_llama.is_hf_dir(path):
        model, cfg, tokenizer = hf_llama.load_hf(path)
        return model.to(device), cfg, tokenizer
    return io.load_model(path, device)
