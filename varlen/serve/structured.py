"""OpenAI `response_format` -> a grammar (llguidance) -> a per-request Guide that masks each step's logits.

The engine creates one GuideFactory (building llguidance's tokenizer view costs up to ~1 s on a large
vocabulary), then one Guide per constrained request: before sampling, `mask_logits_` sets every token the
grammar forbids to -inf; after sampling, `advance` feeds the token to the matcher. Once the JSON value is
complete the grammar allows only the tokenizer's end token (`eod_id`), so the request ends with
finish_reason "stop".
"""
from __future__ import annotations

from typing import Any

import torch
from llguidance import LLMatcher, LLTokenizer
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask  # .torch imports dynamo: 2 s
from tokenizers import Tokenizer

from ..data.tokenizer import TextTokenizer

# Compact JSON (no optional whitespace between tokens), as vLLM with disable_any_whitespace: a small model
# given the choice keeps emitting newlines and spaces and never closes the object.
JSON_OPTIONS = {"whitespace_flexible": False}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


class GrammarError(ValueError):
    """A response_format that cannot become a grammar; the server answers 400 with param "response_format"."""


class GuideError(RuntimeError):
    """The sampled token broke the grammar (a bug in masking or a token sampled without the mask)."""


def grammar_for(response_format: Any) -> str | None:
    """The llguidance grammar that OpenAI's `response_format` asks for; None for plain text.

    Accepts {"type": "text"}, {"type": "json_object"} (any JSON object) and
    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}}.
    Raises GrammarError naming the field at fault. `strict` is accepted and ignored: output is always
    constrained, since an unconstrained small model rarely produces valid JSON.
    """
    if not isinstance(response_format, dict):
        raise GrammarError(f"response_format must be an object like {{\"type\": \"json_object\"}}, "
                           f"got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _compile({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format.json_schema must be an object "
                               "{\"name\": ..., \"schema\": {...}} when type is \"json_schema\"")
        if "name" in spec and not isinstance(spec["name"], str):
            raise GrammarError("response_format.json_schema.name must be a string")
        if "strict" in spec and not isinstance(spec["strict"], (bool, type(None))):
            raise GrammarError("response_format.json_schema.strict must be true or false")
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            found = "missing" if schema is None else f"a {type(schema).__name__}"
            raise GrammarError(f"response_format.json_schema.schema must be a JSON Schema object, "
                               f"e.g. {{\"type\": \"object\", \"properties\": {{...}}}}; it is {found}")
        return _compile(schema, "response_format.json_schema.schema")
    raise GrammarError(f"response_format.type {kind!r} is not supported; use one of "
                       f"{', '.join(RESPONSE_FORMAT_TYPES)}")


def _compile(schema: dict, field: str) -> str:
    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:  # a schema that does not serialize to JSON
        raise GrammarError(f"{field} is not valid JSON: {e}") from e
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise GrammarError(f"{field} is not a usable JSON Schema: {messages[0]}")
    return grammar


class GuideFactory:
    """What every Guide of one engine shares: llguidance's view of the tokenizer, built once.

    `vocab_size` is the model's logits width, which may exceed the tokenizer's (padded embeddings);
    ids past the tokenizer's vocabulary are never allowed.
    """

    def __init__(self, tokenizer: TextTokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_id = tokenizer.eod_id
        # A copy without padding/truncation, as llguidance.hf does: either would distort its token bytes.
        tok = Tokenizer.from_str(tokenizer.tok.to_str())
        tok.no_padding()
        tok.no_truncation()
        self.lltok = LLTokenizer(tok.to_str(), n_vocab=max(vocab_size, tokenizer.vocab_size),
                                 eos_token=tokenizer.eod_id)

    def new(self, grammar: str) -> "Guide":
        """A fresh matcher for one request (one choice of n: each samples its own path)."""
        return Guide(grammar, self.lltok, self.vocab_size)


class Guide:
    """One request's grammar state: masks logits, consumes sampled tokens."""

    def __init__(self, grammar: str, lltok: LLTokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_id = lltok.eos_token
        self._matcher = LLMatcher(lltok, grammar)  # never raises: a bad grammar leaves it in an error state
        if self._matcher.is_error():
            raise GrammarError(f"response_format cannot be compiled: {self._matcher.get_error()}")
        self._bitmask = allocate_token_bitmask(1, lltok.vocab_size)  # (1, ceil(n_vocab / 32)) int32
        self._shifts = torch.arange(32, dtype=torch.int32)

    def allowed(self) -> torch.Tensor:
        """Bool (vocab_size,): which tokens the grammar allows next (only EOS once the value is complete)."""
        fill_next_token_bitmask(self._matcher, self._bitmask)
        words = torch.from_numpy(self._bitmask[0])  # shares memory with the numpy buffer
        bits = (words.unsqueeze(-1) >> self._shifts) & 1  # (n_words, 32): bit i of word w is token 32*w + i
        return bits.flatten().bool()[: self.vocab_size]  # the view is >= vocab_size wide: n_vocab = max(...)

    def mask_logits_(self, logits: torch.Tensor) -> None:
        """Set the logits of disallowed tokens to -inf in place; `logits` is 1-D, vocab_size wide."""
        if logits.dim() != 1 or logits.numel() != self.vocab_size:
            raise ValueError(f"Guide.mask_logits_ takes one row of {self.vocab_size} logits, "
                             f"got shape {tuple(logits.shape)}; pass logits[i] for request i")
        logits.masked_fill_(~self.allowed().to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        """Consume the sampled token; raises GuideError if the grammar forbids it."""
        if not self._matcher.consume_token(int(token)):
            raise GuideError(f"token {token} does not fit the response_format grammar: "
                             f"{self._matcher.get_error() or 'rejected'}; sample from mask_logits_ output")

    @property
    def is_finished(self) -> bool:
        """The grammar admits no more text: the next (and only allowed) token is EOS."""
        return self._matcher.is_stopped()

