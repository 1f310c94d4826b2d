"""The OpenAI-compatible API's schema in one place: pydantic request and response models.

FastAPI validates every body against these (and /openapi.json publishes them), so a route sees only
well-typed values. Requests forbid unknown fields: an OpenAI field this server does not implement gets a
400 naming it instead of being silently ignored. Types are strict (no "0.5" for a float, no 1.0 for an int).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# OpenAI fields a client may send that this server does not implement: named in the 400 so the user knows
# the field was understood, not mistyped. Anything else unknown is refused too, as an unknown field.
UNSUPPORTED = {"tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "suffix", "audio",
               "modalities", "prediction", "reasoning_effort", "web_search_options", "store", "metadata",
               "service_level", "service_tier"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------------------------------ requests

class StreamOptions(_Strict):
    include_usage: bool = False


class JSONSchemaSpec(_Strict):
    name: str = Field("response", max_length=64)
    description: Optional[str] = None
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON Schema the output must validate against.")
    strict: Optional[bool] = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaSpec] = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with a 'schema'")
        return self


class SamplingFields(_Strict):
    """Fields shared by completions and chat; ranges as OpenAI documents them, plus vLLM's extensions."""
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, description="Tokens to generate (default: 16 for completions; "
                                      "for chat, what the context leaves after the prompt).")
    temperature: float = Field(1.0, ge=0, le=2, description="0 (or below 1e-5) is greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off.")
    min_tokens: int = Field(0, ge=0, description="End-of-text and stop_token_ids are masked until this many tokens.")
    n: int = Field(1, ge=1)
    seed: Optional[int] = Field(None, ge=0, lt=2 ** 63)
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    # Bounded below: dividing logits by a vanishing penalty overflows them to inf.
    repetition_penalty: float = Field(1.0, ge=0.01, le=100, description="HF/vLLM style; 1 = off.")
    logit_bias: Optional[dict[Annotated[str, Field(pattern=r"^[0-9]+$")], Annotated[float, Field(ge=-100, le=100)]]] = \
        Field(None, description="Token id (as a string) -> bias in [-100, 100].")
    response_format: Optional[ResponseFormat] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = Field(None, max_length=256, description="An end-user id; recorded nowhere.")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys are token ids written as strings, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {key} is {bias}; use a value in [-100, 100]")
        return v


Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Union[Text, Annotated[list[Text], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="A string, a list of strings, a list of token ids, or a list of those.")
    logprobs: Optional[int] = Field(None, ge=0, description="Logprobs of the chosen token and the top N.")
    echo: bool = Field(False, description="Echoing the prompt is not supported: only false is accepted.")
    best_of: Optional[int] = Field(None, ge=1, description="Must equal n when given (no server-side ranking).")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        if v:
            raise ValueError("echo is not supported here; drop it or send false")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v, info: ValidationInfo):
        if v is not None and v != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported; drop it or set it to n")
        return v


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0)
    add_generation_prompt: bool = True


# ------------------------------------------------------------------------------------------ responses

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "error"]] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[Literal["stop", "length", "error"]] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "varlen"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "loading", "error"]
    detail: Optional[str] = None
