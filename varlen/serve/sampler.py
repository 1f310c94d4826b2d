"""Next token for each request from its logits row: greedy at temperature 0, else top-k / top-p sampling
with the request's own seeded generator, so a request's text does not depend on what it is batched with.

Before sampling, a request's own processors shape its row, in vLLM's order: the grammar mask
(response_format), min_tokens, logit_bias, then repetition, frequency and presence penalties.
"""
from __future__ import annotations

import torch

from ..generate import filter_logits
from .request import Request, SamplingParams


class SamplingFailed(RuntimeError):
    """A request's logits row cannot be sampled from (non-finite, or every token masked): that request ends
    with an error, the rest of the step goes on."""


def process(logits: torch.Tensor, req: Request, eod_id: int) -> torch.Tensor:
    """(vocab,) float32 logits -> the logits after the request's own processors (a copy when any apply)."""
    p = req.params
    if not p.has_processors:
        return logits
    logits = logits.clone()
    if req.guide is not None:
        req.guide.mask_logits_(logits)
    if len(req.output_ids) < p.min_tokens:
        ends = ([] if p.ignore_eos else [eod_id]) + list(p.stop_token_ids)
        logits[ends] = float("-inf")
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
        logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(req.prompt_ids + req.output_ids, dtype=torch.long).unique()
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and req.output_ids:
        counts = torch.bincount(torch.tensor(req.output_ids, dtype=torch.long), minlength=logits.numel())
        counts = counts[:logits.numel()].to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if not bool((logits > float("-inf")).any()):
        raise SamplingFailed("every token is masked for this request (its grammar, min_tokens and logit_bias "
                             "leave nothing to sample)")
    return logits


def probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(vocab,) float32 logits -> the distribution sampling draws from (temperature, then top-k / top-p).
    Speculative decoding verifies against this same distribution, so its samples follow it exactly."""
    return filter_logits(logits / params.temperature, params.top_k, params.top_p).softmax(-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """(vocab,) float32 logits -> token id (argmax when greedy)."""
    if params.is_greedy:
        return int(logits.argmax())
    p = probs(logits, params)
    if not torch.isfinite(p).all():
        raise SamplingFailed(f"sampling at temperature {params.temperature} gave a non-finite distribution")
    return int(torch.multinomial(p, 1, generator=generator))


def logprob_entry(logits: torch.Tensor, token: int, top: int) -> dict:
    """The chosen token's logprob and the `top` most likely alternatives, for a request that asked for them."""
    # Logprobs of the model's own distribution (before temperature and processors), as OpenAI reports them.
    logp = logits.log_softmax(-1)
    best = torch.topk(logp, top) if top else None
    return {"token_id": token, "logprob": float(logp[token]),
            "top": [] if best is None else [(int(i), float(v)) for v, i in zip(best.values, best.indices)]}
