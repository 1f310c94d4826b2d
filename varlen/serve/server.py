"""OpenAI-compatible HTTP API over the engine: routes only. /v1/completions, /v1/chat/completions, /v1/models,
server-sent-event streaming, /health and Prometheus /metrics; the schema lives in protocol.py.

Every bad input gets a 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}}) and
never reaches the engine; a request that fails inside a step fails alone; a client that goes away has its
request cancelled and its blocks freed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeConfig
from . import protocol as api
from .async_engine import AsyncEngine, EngineDead
from .engine import Engine, QueueFull, StepOutput
from .request import RequestError, SamplingParams

log = logging.getLogger("varlen.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def validation_error(errors: list[dict]) -> APIError:
    """FastAPI's list of pydantic errors -> one 400 naming the first offending field, OpenAI's way."""
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    # Union members add their type to the path (stop.str, prompt.constrained-str): keep field names and indexes.
    param = ".".join(p for p in loc if p and "[" not in p and "-" not in p
                     and p not in ("str", "int", "float", "bool", "list", "dict")) or None
    if loc and loc[0] == "prompt" and e.get("type") != "missing":
        return APIError(400, "'prompt' must be a non-empty string, a list of them, a list of token ids (integers "
                             ">= 0), or a list of those", "prompt")
    if e.get("type") == "extra_forbidden":
        name = loc[-1] if loc else "?"
        what = "an OpenAI field this server does not support" if name in api.UNSUPPORTED else "not a known field"
        return APIError(400, f"'{param or name}' is {what}; remove it", param or name)
    if e.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}")
    if e.get("type") == "missing":
        return APIError(400, f"'{param}' is required", param)
    if not loc:
        return APIError(400, f"request body: {e.get('msg')}; send a JSON object")
    return APIError(400, f"'{param}': {e.get('msg')}, got {_short(e.get('input'))}", param)


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


ERRORS = {status: {"model": api.ErrorResponse, "description": text} for status, text in [
    (400, "Invalid request: the message names the field."), (401, "Missing or wrong API key."),
    (404, "Unknown model."), (429, "Queue full: retry after Retry-After seconds."),
    (500, "The request failed while generating."), (503, "The model is loading or the engine has stopped.")]}
# No schema for the event stream: OpenAPI has no way to say "each event's data is a chunk" that tools agree on.
STREAM_OK = {200: {"content": {"text/event-stream": {}},
                   "description": "A JSON body, or server-sent events when stream is true."}}


# ------------------------------------------------------------------------------------------ the app

class ServerState:
    def __init__(self, name: str, cfg: ServeConfig, api_keys: list[str]):
        self.name, self.cfg, self.api_keys = name, cfg, api_keys
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.chat_template = None
        self.max_len = 0
        self.created = int(time.time())
        self.on_engine_death = None  # set by serve(): stops the server so the process exits non-zero

    def authorized(self, header: str | None) -> bool:
        if not self.api_keys:
            return True
        given = (header or "").removeprefix("Bearer ").strip().encode()
        ok = False
        for key in self.api_keys:  # compare against every key: the time does not say which one nearly matched
            ok |= hmac.compare_digest(given, key.encode())
        return ok


def load_engine(state: ServerState, path: str | Path, device: str = "cpu") -> None:
    from ..checkpoint import hf_llama, io, load_model
    from .chat_template import load_chat_template
    try:
        model, _, tokenizer = load_model(path, device)
        engine = Engine(model, tokenizer, state.cfg)
        # A run directory keeps its tokenizer files in its newest checkpoint.
        state.chat_template = load_chat_template(path if hf_llama.is_hf_dir(path) else io.resolve(path))
        state.max_len = engine.max_model_len
        state.engine = AsyncEngine(engine, on_death=state.on_engine_death)
    except Exception as e:  # reported by /health; the process stays up to say why
        log.exception("loading %s failed", path)
        state.load_error = f"{type(e).__name__}: {e}"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="varlen", version="0.1.0", docs_url=None, redoc_url=None,
                  description="OpenAI-compatible completions and chat over varlen's continuous-batching engine.")

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(Exception)
    async def _bug(_, e: Exception):  # still an OpenAI error body, and the traceback in the log
        log.exception("request failed")
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(e.status_code, str(e.detail), kind=kind, headers=e.headers))  # 405: Allow

    def guard(request: HTTPRequest) -> None:
        # A dependency rather than middleware: Starlette's BaseHTTPMiddleware wraps the receive channel,
        # and then request.is_disconnected() never sees the client leave.
        if not state.authorized(request.headers.get("authorization")):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'",
                           kind="authentication_error")
        if state.engine is None:
            msg = state.load_error or "the model is still loading; retry shortly"
            raise APIError(503, msg, kind="server_error", headers={"Retry-After": "1"})
        if state.engine.dead:
            raise APIError(503, state.engine.dead, kind="server_error")

    @app.get("/health", response_model=api.Health, responses={503: {"model": api.Health}})
    async def health():
        if state.engine is None or state.engine.dead:
            status = "loading" if state.engine is None and not state.load_error else "error"
            detail = state.load_error or (state.engine.dead if state.engine else None)
            return JSONResponse(api.Health(status=status, detail=detail).model_dump(), status_code=503)
        return api.Health(status="ok")

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics():
        body = generate_latest(state.engine.registry) if state.engine else b""
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=api.ModelList, dependencies=[Depends(guard)],
             responses={k: ERRORS[k] for k in (401, 503)})
    async def models():
        return api.ModelList(data=[api.ModelCard(id=state.name, created=state.created, max_model_len=state.max_len)])

    @app.post("/v1/completions", response_model=api.CompletionResponse, dependencies=[Depends(guard)],
              responses={**STREAM_OK, **ERRORS})
    async def completions(body: api.CompletionRequest, request: HTTPRequest):
        prompts = _prompts(body.prompt)
        params = sampling_params(body, state, logprobs=body.logprobs)
        return await run(request, body, prompts, params, chat=False)

    @app.post("/v1/chat/completions", response_model=api.ChatCompletionResponse, dependencies=[Depends(guard)],
              responses={**STREAM_OK, **ERRORS})
    async def chat(body: api.ChatCompletionRequest, request: HTTPRequest):
        from .chat_template import ChatTemplateError
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            text = state.chat_template.render(messages, add_generation_prompt=body.add_generation_prompt)
        except ChatTemplateError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        tok = state.engine.engine.tokenizer
        prompt = tok.encode_prompt(text, add_special_tokens=not state.chat_template.carries_special_tokens)
        top = body.top_logprobs if body.logprobs else None
        if body.logprobs and top is None:
            top = 0
        # Without max_tokens a chat reply may use the rest of the context, as OpenAI's and vLLM's do (16 is the
        # completions API's default, and cuts a chat answer off mid-sentence).
        params = sampling_params(body, state, logprobs=top, default_max_tokens=max(1, state.max_len - len(prompt)))
        return await run(request, body, [prompt], params, chat=True)

    async def run(request: HTTPRequest, body: api.SamplingFields, prompts: list, params: SamplingParams,
                  chat: bool):
        if body.model is not None and body.model != state.name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {state.name!r}", "model",
                           kind="not_found_error")
        n = params.n
        if len(prompts) * n > state.cfg.max_waiting:
            raise APIError(400, f"{len(prompts)} prompts x n={n} is more completions than this server queues at "
                                f"once ({state.cfg.max_waiting}); send fewer", "prompt")
        base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        queues, ids = [], []
        try:
            for i, prompt in enumerate(prompts):
                for j in range(n):
                    rid = f"{base}-{i}-{j}"
                    seed = None if params.seed is None else params.seed + j
                    queues.append(await state.engine.submit(prompt, replace(params, n=1, seed=seed), rid))
                    ids.append(rid)
        except (RequestError, QueueFull, EngineDead) as e:
            for rid in ids:
                state.engine.abort(rid)
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
            if isinstance(e, EngineDead):
                raise APIError(503, str(e), kind="server_error") from None
            where = f"prompt {len(ids) // n}: " if len(prompts) > 1 else ""
            raise APIError(400, where + str(e), _param_of(str(e))) from None
        meta = {"id": base, "created": int(time.time()), "model": state.name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream_events(queues, ids, n, meta, chat, include_usage, params),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect(request, queues, ids, n, meta, chat)

    async def collect(request, queues, ids, n, meta, chat):
        results: dict[int, dict] = {}
        pending = {asyncio.ensure_future(_drain(q)): j for j, q in enumerate(queues)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, timeout=0.1)
                for task in done:
                    results[pending.pop(task)] = task.result()
                if pending and await request.is_disconnected():
                    raise asyncio.CancelledError
        except BaseException as e:  # the client went away, or the engine stopped
            for task in pending:
                task.cancel()
            for rid in ids:
                state.engine.abort(rid)
            if isinstance(e, EngineDead):
                raise APIError(503, str(e), kind="server_error") from None
            raise
        failed = [r for r in results.values() if r["finish_reason"] == "error"]
        if failed:
            raise APIError(500, f"generation failed: {failed[0]['error']}", kind="server_error")
        choices, completion_tokens = [], 0
        for j in range(len(queues)):
            r = results[j]
            completion_tokens += r["tokens"]
            if chat:
                lp = api.ChatLogprobs(content=_chat_lp(r["logprobs"], state)) if r["logprobs"] is not None else None
                choices.append(api.ChatChoice(index=j, message=api.AssistantMessage(content=r["text"]), logprobs=lp,
                                              finish_reason=r["finish_reason"]))
            else:
                lp = _completion_lp(r["logprobs"], state) if r["logprobs"] is not None else None
                choices.append(api.CompletionChoice(index=j, text=r["text"], logprobs=lp,
                                                    finish_reason=r["finish_reason"]))
        usage = _usage([results[j] for j in range(0, len(queues), n)], completion_tokens)
        cls = api.ChatCompletionResponse if chat else api.CompletionResponse
        return cls(**meta, choices=choices, usage=usage)

    async def stream_events(queues, ids, n, meta, chat, include_usage, params):
        kind = "chat.completion.chunk" if chat else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()
        forwards = [asyncio.ensure_future(_forward(q, j, merged)) for j, q in enumerate(queues)]
        live, completion_tokens, finals = len(queues), 0, {}
        try:
            if chat:
                for j in range(len(queues)):
                    first = {"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield _sse({**meta, "object": kind, "choices": [first]})
            while live:
                j, out = await merged.get()
                if isinstance(out, Exception):
                    status = 503 if isinstance(out, EngineDead) else 500
                    yield _sse(APIError(status, str(out), kind="server_error").body())
                    break
                if out.finish_reason == "error":
                    yield _sse(APIError(500, f"generation failed: {out.error}", kind="server_error").body())
                    break
                completion_tokens += len(out.new_token_ids)
                # Logprobs go out with their tokens even while the text is held back (a partial character
                # or a possible stop string), so a stream carries every token's logprob exactly once.
                if not (out.new_text or out.new_logprobs or out.finished):
                    continue
                if chat:
                    choice = {"index": j, "delta": {"content": out.new_text} if out.new_text else {},
                              "finish_reason": out.finish_reason}
                    if out.new_logprobs:
                        choice["logprobs"] = {"content": [x.model_dump() for x in _chat_lp(out.new_logprobs, state)]}
                else:
                    choice = {"index": j, "text": out.new_text, "finish_reason": out.finish_reason,
                              "logprobs": _completion_lp(out.new_logprobs, state).model_dump()
                              if out.new_logprobs else None}
                yield _sse({**meta, "object": kind, "choices": [choice]})
                if out.finished:
                    live -= 1
                    finals[j] = {"prompt_tokens": out.num_prompt_tokens, "cached_tokens": out.num_cached_tokens}
            else:
                if include_usage:
                    usage = _usage([finals[j] for j in range(0, len(queues), n)], completion_tokens)
                    yield _sse({**meta, "object": kind, "choices": [], "usage": usage.model_dump()})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the response task is cancelled)
            for f in forwards:
                f.cancel()
            for rid in ids:
                state.engine.abort(rid)

    return app


def sampling_params(body: api.SamplingFields, state: ServerState, logprobs: int | None,
                    default_max_tokens: int = 16) -> SamplingParams:
    """The validated body -> the engine's SamplingParams; limits that depend on this server's config here."""
    from .structured import GrammarError, grammar_for
    cfg = state.cfg
    max_tokens = default_max_tokens if body.max_tokens is None else body.max_tokens
    stops = body.stop or []  # a list once validated; None when not sent
    for ok, param, msg in [
        (max_tokens <= state.max_len, "max_tokens", f"must be at most the context length {state.max_len}"),
        (body.n <= cfg.max_n, "n", f"must be at most {cfg.max_n} on this server"),
        (len(stops) <= cfg.max_stop, "stop", f"takes at most {cfg.max_stop} strings on this server"),
        (logprobs is None or logprobs <= cfg.max_logprobs, "top_logprobs" if isinstance(body, api.ChatCompletionRequest)
         else "logprobs", f"must be at most {cfg.max_logprobs} on this server"),
        (body.min_tokens <= max_tokens, "min_tokens", f"must be at most max_tokens ({max_tokens})"),
    ]:
        if not ok:
            raise APIError(400, f"'{param}' {msg}", param)
    grammar = None
    if body.response_format is not None:
        try:
            grammar = grammar_for(body.response_format.model_dump(by_alias=True, exclude_none=True))
        except GrammarError as e:
            raise APIError(400, f"response_format: {e}", "response_format") from None
    return SamplingParams(
        max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
        n=body.n, stop=list(stops), stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
        logprobs=logprobs, min_tokens=body.min_tokens, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()}, grammar=grammar)


def _prompts(prompt) -> list:
    """OpenAI's prompt forms -> a list of prompts, each a string or a list of token ids."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    if not prompts:
        raise APIError(400, "'prompt' is an empty list; send a string or a list of strings", "prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise APIError(400, f"'prompt' {i} is empty", "prompt")
    return prompts


def _usage(firsts: list[dict], completion_tokens: int) -> api.Usage:
    """Usage of a response: each prompt counted once (not once per n), with its prefix-cache hits."""
    prompt_tokens = sum(r["prompt_tokens"] for r in firsts)
    cached = sum(r["cached_tokens"] for r in firsts)
    return api.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens,
                     prompt_tokens_details=api.PromptTokensDetails(cached_tokens=cached))


async def _drain(q: asyncio.Queue) -> dict:
    tokens, text, lps, has_lp = 0, [], [], False
    while True:
        out = await q.get()
        if isinstance(out, Exception):
            raise out
        tokens += len(out.new_token_ids)
        text.append(out.new_text)
        lps += out.new_logprobs
        has_lp = has_lp or bool(out.new_logprobs)
        if out.finished:
            return {"text": "".join(text), "tokens": tokens, "finish_reason": out.finish_reason, "error": out.error,
                    "logprobs": lps if has_lp else None, "prompt_tokens": out.num_prompt_tokens,
                    "cached_tokens": out.num_cached_tokens}


async def _forward(q: asyncio.Queue, j: int, merged: asyncio.Queue) -> None:
    while True:
        out = await q.get()
        await merged.put((j, out))
        if isinstance(out, Exception) or isinstance(out, StepOutput) and out.finished:
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "logprobs", "stop_token_ids", "stop",
                 "logit_bias", "response_format", "prompt", "n"):
        if message.startswith(name) or f"'{name}'" in message or f"({name}" in message or f" {name} " in message:
            return name
    return None


def _token_str(state: ServerState, token: int) -> str:
    return state.engine.engine.tokenizer.decode([token])


def _completion_lp(lps: list[dict], state: ServerState) -> api.CompletionLogprobs:
    return api.CompletionLogprobs(tokens=[_token_str(state, lp["token_id"]) for lp in lps],
                                  token_logprobs=[lp["logprob"] for lp in lps],
                                  top_logprobs=[{_token_str(state, t): v for t, v in lp["top"]} for lp in lps])


def _chat_lp(lps: list[dict], state: ServerState) -> list[api.ChatTokenLogprob]:
    def entry(token: int, logprob: float) -> dict:
        s = _token_str(state, token)
        return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}
    return [api.ChatTokenLogprob(**entry(lp["token_id"], lp["logprob"]),
                                 top_logprobs=[api.TopLogprob(**entry(t, v)) for t, v in lp["top"]]) for lp in lps]


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_keys: list[str] | None = None,
          cfg: ServeConfig | None = None, name: str | None = None, log_level: str = "info") -> int:
    """Listen at once (/health says 503 while the model loads), load the model in the background. Returns the
    process's exit code: 1 if the engine stopped (after in-flight requests were failed), else 0."""
    import uvicorn
    from uvicorn.config import LOG_LEVELS, LOGGING_CONFIG
    state = ServerState(name or Path(path).name, cfg or ServeConfig(), api_keys or [])
    # varlen's own messages (e.g. at --log-level info, the dtype the engine chose and why) print as uvicorn's
    # do, at the same level; without a handler only warnings and errors would reach stderr.
    own = {"handlers": ["default"], "level": LOG_LEVELS.get(log_level, log_level), "propagate": False}
    log_config = {**LOGGING_CONFIG, "loggers": {**LOGGING_CONFIG["loggers"], "varlen": own}}
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=host, port=port, log_level=log_level,
                                           log_config=log_config))

    def engine_died(reason: str) -> None:
        # Let /health answer 503 for a moment (a probe sees why), then stop accepting and exit non-zero.
        threading.Timer(1.0, lambda: setattr(server, "should_exit", True)).start()

    state.on_engine_death = engine_died
    threading.Thread(target=load_engine, args=(state, path), daemon=True).start()
    server.run()
    if state.engine is not None and state.engine.dead:
        log.error("exiting: %s", state.engine.dead)
        return 1
    return 0
