"""Autoregressive sampling from a trained model: temperature, top-k, top-p; temperature 0 is greedy."""
from __future__ import annotations

import torch

from .batch import Batch

# Temperatures below this sample as greedy: dividing logits by them overflows the softmax (vLLM's epsilon).
GREEDY_BELOW = 1e-5


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(V,) logits with everything outside the top-k and the top-p nucleus set to -inf."""
    logits = logits.clone()
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[0] = False  # even when top_p rounds to 0 in float32
        logits[order[drop]] = float("-inf")
    return logits


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator | None) -> int:
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop_id: int | None = None,
             max_seq_len: int | None = None) -> list[int]:
    """New token ids after `prompt_ids` (recomputes the window each step; fine for short CLI samples)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed if seed is not None else torch.seed())
    ids = list(prompt_ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        window = ids[-max_seq_len:] if max_seq_len else ids
        x = torch.tensor(window, device=device)
        logits = model(x, Batch.from_seqlens([len(window)], device=device))[-1].cpu()
        tok = sample_token(logits, temperature, top_k, top_p, generator)
        if stop_id is not None and tok == stop_id:
            break
        ids.append(tok)
        out.append(tok)
    return out
