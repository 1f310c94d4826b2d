"""Next token for each request from its logits row: greedy at temperature 0, else top-k / top-p sampling
with the request's own seeded generator, so a request's text does not depend on what it is batched with."""
from __future__ import annotations

import torch

from ..generate import filter_logits
from .request import SamplingParams


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(vocab,) float32 logits -> the distribution sampling draws from (temperature, then top-k / top-p).
    Speculative decoding verifies against this same distribution, so its samples follow it exactly."""
    return filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """(vocab,) float32 logits -> token id (argmax at temperature 0)."""
    if params.temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(probs(logits, params), 1, generator=generator))


def logprob_entry(logits: torch.Tensor, token: int, top: int) -> dict:
    """The chosen token's logprob and the `top` most likely alternatives, for a request that asked for them."""
    # Logprobs of the model's own distribution (before temperature and filtering), as OpenAI reports them.
    logp = logits.log_softmax(-1)
    best = torch.topk(logp, top) if top else None
    return {"token_id": token, "logprob": float(logp[token]),
            "top": [] if best is None else [(int(i), float(v)) for v, i in zip(best.values, best.indices)]}
