"""Next token for each request from its logits row: greedy at temperature 0, else top-k / top-p sampling
with the request's own seeded generator, so a request's text does not depend on what it is batched with."""
from __future__ import annotations

import torch

from ..generate import filter_logits
from .request import Request


def sample(logits: torch.Tensor, req: Request) -> tuple[int, dict | None]:
    """(vocab,) float32 logits -> token id, and its logprob entry when the request asked for logprobs."""
    p = req.params
    if p.temperature == 0:
        token = int(logits.argmax())
    else:
        probs = filter_logits(logits / p.temperature, p.top_k, p.top_p).softmax(-1)
        token = int(torch.multinomial(probs, 1, generator=req.generator))
    if p.logprobs is None:
        return token, None
    # Logprobs of the model's own distribution (before temperature and filtering), as OpenAI reports them.
    logp = logits.log_softmax(-1)
    top = torch.topk(logp, p.logprobs) if p.logprobs else None
    entry = {"token_id": token, "logprob": float(logp[token]),
             "top": [] if top is None else [(int(i), float(v)) for v, i in zip(top.values, top.indices)]}
    return token, entry
