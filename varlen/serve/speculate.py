"""Self-speculative decoding with the model's own multi-token-prediction heads (pure, given logits).

At a request's last forward, head j (predicting token t+1+j) proposes a draft for each of the next k
positions after the token just sampled. The next forward runs that token and its drafts as extra query
tokens, which gives the model's own distribution after every draft; the request then keeps the longest run
of drafts that ordinary decoding would have produced, plus one token from the model at the first rejection
(or after the last draft). So each step yields 1 to k + 1 tokens for one forward, and the output is exactly
what ordinary decoding gives: the same tokens when greedy, the same distribution when sampling
(rejection sampling, Leviathan et al. 2023 / Chen et al. 2023).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError, ServeConfig
from .request import SamplingParams
from .sampler import probs, sample


def num_drafts_per_step(cfg: ServeConfig, mtp_heads: int) -> int:
    """Drafts per step the config asks of a model with `mtp_heads` heads (0 = not speculating)."""
    if not cfg.speculative:
        return 0
    if mtp_heads == 0:
        raise ConfigError("--speculative drafts with MTP heads, but this model has none; train with "
                          "--model.mtp_heads 3 or add heads with --train.freeze_trunk")
    if not 0 <= cfg.num_speculative <= mtp_heads:
        raise ConfigError(f"--num-speculative is {cfg.num_speculative}, but this model has {mtp_heads} MTP heads; "
                          f"use 1 to {mtp_heads}, or 0 for all of them")
    return cfg.num_speculative or mtp_heads


def draft(head_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
          ) -> tuple[list[int], torch.Tensor | None]:
    """head_logits (d, vocab), row j-1 from head j -> d draft ids, and for sampling the (d, vocab)
    distributions they were drawn from (the request's own temperature / top-k / top-p applied, like p's)."""
    if params.is_greedy:
        return head_logits.argmax(-1).tolist(), None
    q = torch.stack([probs(row, params) for row in head_logits])
    return torch.multinomial(q, 1, generator=generator)[:, 0].tolist(), q


def confidences(head_logits: torch.Tensor, q: torch.Tensor | None) -> list[float]:
    """Each head's largest probability (of its logits when greedy; of q, the distribution its draft was drawn
    from, when sampling): its estimate that its draft is what the model produces. A function of the heads'
    distributions only, never of the sampled drafts: cutting drafts by their own sampled values would skew
    which drafts are verified, and rejection sampling would no longer give the model's distribution."""
    return (torch.softmax(head_logits.float(), -1) if q is None else q).amax(-1).tolist()


def draft_length(conf: list[float], costs: list[float]) -> int:
    """How many of the drafts to verify: the d in 0..len(conf) that maximizes expected tokens per unit of step
    cost, (1 + sum over i <= d of conf[0] * ... * conf[i - 1]) / costs[d], where costs[d] is the measured cost of
    a step of 1 + d new tokens relative to costs[0] (an ordinary decode step). Ties go to fewer drafts. A
    verify step that costs as much as an ordinary one keeps every draft; drafts the heads doubt, on a machine
    where each extra row costs, are dropped. What drafting itself costs every step (the heads, their logits) is
    not counted: d = 0 is a speculative engine's own step, which can be slower than a plain engine's."""
    best, best_rate, expected, p = 0, 1.0 / costs[0], 1.0, 1.0
    for d in range(1, min(len(conf), len(costs) - 1) + 1):
        p *= conf[d - 1]
        expected += p
        rate = expected / costs[d]
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = d, rate
    return best


def verify_greedy(base_rows: torch.Tensor, drafts: list[int]) -> list[int]:
    """base_rows (d + 1, vocab): the model's logits at the last token and at each draft -> the drafts that
    match the argmax of the row before them, then the argmax of the first mismatching row (or of the row
    after the last draft): exactly the tokens greedy decoding would produce next."""
    best = base_rows.argmax(-1).tolist()
    out: list[int] = []
    for i, token in enumerate(drafts):
        if token != best[i]:
            break
        out.append(token)
    out.append(best[len(out)])
    return out


def verify_sampling(p_rows: torch.Tensor, q_rows: torch.Tensor, drafts: list[int],
                    generator: torch.Generator | None) -> list[int]:
    """p_rows (d + 1, vocab): the model's distribution at the last token and at each draft; q_rows (d, vocab):
    each draft's own distribution. Draft i is kept with probability min(1, p(x) / q(x)); the first one
    rejected is replaced by a sample of normalize(max(0, p - q)), and if all are kept one more token is drawn
    from the last row. Each emitted token then follows p exactly, given the tokens before it."""
    out: list[int] = []
    for i, token in enumerate(drafts):
        p, q = p_rows[i], q_rows[i]
        # u * q < p is u < p / q without dividing (q > 0: the draft was drawn from q).
        if float(torch.rand((), generator=generator)) * float(q[token]) < float(p[token]):
            out.append(token)
            continue
        residual = (p - q).clamp_min(0)
        if not float(residual.sum()) > 0:  # p <= q everywhere means p == q up to rounding: p is the residual
            residual = p
        out.append(int(torch.multinomial(residual, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(p_rows[len(drafts)], 1, generator=generator)))
    return out


def accept(base_rows: torch.Tensor, drafts: list[int], q_rows: torch.Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> list[int]:
    """The tokens a request emits this step, from its logits rows (float32, d + 1 of them for d drafts).
    Without drafts this is ordinary sampling, bit for bit (the same draw from the same generator)."""
    if not drafts:
        return [sample(base_rows[0], params, generator)]
    if params.is_greedy:
        return verify_greedy(base_rows, drafts)
    p_rows = torch.stack([probs(row, params) for row in base_rows])
    return verify_sampling(p_rows, q_rows, drafts, generator)


@dataclass
class SpecStats:
    """Counters for /metrics and benchmarks: per head j (index j - 1), drafts verified and accepted."""
    num_heads: int
    drafted: list[int] = field(default_factory=list)
    accepted: list[int] = field(default_factory=list)
    verify_steps: int = 0    # request-steps that verified at least one draft
    emitted: int = 0         # tokens those steps produced (accepted drafts + the model's own token)

    def __post_init__(self):
        self.drafted = self.drafted or [0] * self.num_heads
        self.accepted = self.accepted or [0] * self.num_heads

    def record(self, num_drafts: int, num_accepted: int) -> None:
        if not num_drafts:
            return
        for j in range(num_drafts):
            self.drafted[j] += 1
            self.accepted[j] += j < num_accepted
        self.verify_steps += 1
        self.emitted += num_accepted + 1

    @property
    def acceptance(self) -> list[float]:
        """Per head: the share of its drafts accepted (a draft is verified only if the ones before it were
        drafted, and accepted only if they were all accepted too)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted, self.drafted)]

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a verify step produced for its request (1 = every draft rejected)."""
        return self.emitted / self.verify_steps if self.verify_steps else 0.0
