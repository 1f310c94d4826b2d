"""A generation request and its sampling parameters; the state the scheduler and block manager act on."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from ..generate import GREEDY_BELOW


class RequestError(ValueError):
    """Bad sampling parameters or prompt: the message names the field and the allowed range."""


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0           # 0 = greedy
    top_k: int = 0                     # 0 = off
    top_p: float = 1.0
    seed: int | None = None            # per request: the same seed gives the same text in any batch
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None        # None = off; k = the chosen token's logprob plus the top k
    min_tokens: int = 0                # end-of-text and stop_token_ids are masked until this many tokens
    presence_penalty: float = 0.0      # OpenAI's: minus this from every token already generated
    frequency_penalty: float = 0.0     # OpenAI's: minus this times the token's count in the output so far
    repetition_penalty: float = 1.0    # HF/vLLM's: divide (positive) or multiply (negative) the logits of
                                       # tokens in the prompt or the output; 1 = off
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None         # llguidance grammar the output must follow (response_format)

    @property
    def is_greedy(self) -> bool:
        # Dividing by a temperature this small overflows the softmax to NaN; it means greedy anyway.
        return self.temperature < GREEDY_BELOW

    @property
    def has_processors(self) -> bool:
        """Whether the logits need this request's own processing (penalties, bias, grammar, min_tokens) before
        sampling; such requests do not draft speculatively, as each draft would change what follows it."""
        return bool(self.min_tokens or self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.grammar is not None)

    def validate(self, max_n: int = 8, max_stop: int = 4, max_logprobs: int = 5) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (1 <= self.n <= max_n, f"n must be between 1 and {max_n}, got {self.n}"),
            (len(self.stop) <= max_stop, f"at most {max_stop} stop strings, got {len(self.stop)}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (self.logprobs is None or 0 <= self.logprobs <= max_logprobs,
             f"logprobs must be between 0 and {max_logprobs}, got {self.logprobs}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0.01 <= self.repetition_penalty <= 100,
             f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty}"),
            (all(-100 <= b <= 100 for b in self.logit_bias.values()), "logit_bias values must be in [-100, 100]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RequestError(msg)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # a request is itself: identity, not field-by-field, in queues and `in` checks
class Request:
    """One sequence being generated. Tokens [0, num_computed) have K/V in the cache; the model still has to
    run tokens [num_computed, num_tokens), and only once it reaches num_tokens is a new token sampled."""
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int = 0                   # admission order: first come, first served
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0                # prompt tokens whose K/V came from the prefix cache
    finish_reason: str | None = None   # "stop" | "length" | "abort"
    output_text: str = ""
    logprobs: list[dict] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Speculative decoding: tokens the MTP heads proposed after output_ids, to be verified by the next forward
    # (positions num_tokens, num_tokens + 1, ...), and the distributions they were sampled from (None when greedy).
    draft_ids: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    guide: Any = None                  # structured.Guide enforcing params.grammar, advanced with each token
    detok: Any = None                  # the tokenizer's decode_stream(): output text, one token at a time

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
