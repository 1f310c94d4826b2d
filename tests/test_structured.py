"""response_format -> llguidance Guide, driven by random logits: whatever the model prefers, output parses."""
import json
import re

import pytest
import torch

from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import train_tokenizer
from varlen.serve.structured import GrammarError, Guide, GuideError, GuideFactory, grammar_for

VOCAB = 448  # the model's logits are wider than the tokenizer's 400 ids, as with padded embeddings
MAX_STEPS = 300
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:10]], 400)


@pytest.fixture(scope="module")
def factory(tok):
    return GuideFactory(tok, VOCAB)


@pytest.fixture(scope="module")
def closing_bias(tok):
    """Favour tokens that close strings/containers (and EOS): random logits otherwise write long strings."""
    bias = torch.zeros(VOCAB)
    for i in range(tok.vocab_size):
        if i == tok.eod_id or any(c in tok.decode([i]) for c in '"]}'):
            bias[i] = 2.0
    return bias


def run(guide: Guide, tok, seed: int, bias: torch.Tensor | None = None) -> str:
    """Greedy decode of masked random logits until EOS; checks the mask at every step on the way."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for _ in range(MAX_STEPS):
        logits = torch.randn(VOCAB, generator=gen)
        if bias is not None:
            logits += bias
        before = logits.clone()
        guide.mask_logits_(logits)
        allowed = torch.isfinite(logits)
        assert torch.equal(allowed, guide.allowed())
        assert torch.equal(logits[allowed], before[allowed])  # allowed logits are left as they were
        assert not allowed[tok.vocab_size:].any(), "ids past the tokenizer's vocabulary must never be allowed"
        if guide.is_finished:
            assert allowed.nonzero().flatten().tolist() == [tok.eod_id]
        token = int(logits.argmax())
        guide.advance(token)
        if token == tok.eod_id:
            return tok.decode(ids)
        ids.append(token)
    raise AssertionError(f"seed {seed}: no EOS after {MAX_STEPS} steps: {tok.decode(ids)!r}")


def compact(text: str) -> bool:
    """No whitespace outside JSON strings: small models must not be offered endless indentation."""
    return not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', '""', text))


def test_text_format_is_unconstrained():
    assert grammar_for({"type": "text"}) is None


@pytest.mark.parametrize("seed", range(8))
def test_json_object_output_is_a_compact_object(factory, tok, closing_bias, seed):
    text = run(factory.new(grammar_for({"type": "json_object"})), tok, seed, closing_bias)
    assert isinstance(json.loads(text), dict), text
    assert compact(text), text


@pytest.mark.parametrize("seed", range(8))
def test_json_schema_output_validates(factory, tok, seed):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    text = run(factory.new(grammar_for(rf)), tok, seed)  # no bias: maxLength alone bounds the string
    value = json.loads(text)
    assert isinstance(value, dict) and set(value) == {"name", "age"}, text
    assert isinstance(value["name"], str) and len(value["name"]) <= 8, text
    assert isinstance(value["age"], int) and not isinstance(value["age"], bool), text
    assert compact(text), text


@pytest.mark.parametrize("seed", range(4))
def test_nested_schema_with_enum_array_and_boolean(factory, tok, closing_bias, seed):
    schema = {"type": "object", "additionalProperties": False, "required": ["tags", "ok"],
              "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
                             "ok": {"type": "boolean"}}}
    text = run(factory.new(grammar_for({"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})),
               tok, seed, closing_bias)
    value = json.loads(text)
    assert set(value) == {"tags", "ok"} and isinstance(value["ok"], bool), text
    assert len(value["tags"]) <= 3 and set(value["tags"]) <= {"red", "green"}, text


def test_guides_from_one_factory_are_independent(factory, tok, closing_bias):
    grammar = grammar_for({"type": "json_object"})
    a, b = factory.new(grammar), factory.new(grammar)
    run(a, tok, 0, closing_bias)
    assert a.is_finished is True and b.is_finished is False
    assert json.loads(run(b, tok, 1, closing_bias)) is not None


def test_forbidden_token_raises(factory, tok):
    guide = factory.new(grammar_for({"type": "json_object"}))
    letter = tok.tok.token_to_id("a")
    assert letter is not None and not guide.allowed()[letter]  # an object must start with "{"
    with pytest.raises(GuideError, match="does not fit"):
        guide.advance(letter)


def test_mask_needs_one_row_of_vocab_size(factory):
    guide = factory.new(grammar_for({"type": "json_object"}))
    with pytest.raises(ValueError, match="one row of 448 logits"):
        guide.mask_logits_(torch.zeros(2, VOCAB))
    with pytest.raises(ValueError, match="one row of 448 logits"):
        guide.mask_logits_(torch.zeros(400))


@pytest.mark.parametrize("response_format, field, problem", [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "json_schema.schema", "nonsense"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema", "missing"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "json_schema.schema", "list"),
    ({"type": "json_schema", "json_schema": "{}"}, "response_format.json_schema", "must be an object"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "json_schema.name", "string"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     "json_schema.schema", "minimum"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(("}}},
     "json_schema.schema", "regex"),
    ({"type": "xml"}, "response_format.type", "'xml'"),
    ({}, "response_format.type", "None"),
    ("json", "response_format", "str"),
])
def test_bad_response_format_raises_grammar_error(response_format, field, problem):
    with pytest.raises(GrammarError) as err:
        grammar_for(response_format)
    assert field in str(err.value) and problem in str(err.value)
    assert isinstance(err.value, ValueError)  # the server maps ValueError-like input errors to HTTP 400


def test_unusable_grammar_string_raises_grammar_error(factory):
    with pytest.raises(GrammarError, match="cannot be compiled"):
        factory.new('{"grammars": [{"lark_grammar": "start: undefined_rule"}]}')
