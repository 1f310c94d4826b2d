"""OpenAI-compatible HTTP API over the engine: /v1/completions, /v1/chat/completions, /v1/models,
server-sent-event streaming, /health and Prometheus /metrics.

Every bad input gets a 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}}) and
never reaches the engine; a client that goes away has its request cancelled and its blocks freed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..config import ServeConfig
from .async_engine import AsyncEngine
from .engine import Engine, QueueFull, StepOutput
from .request import RequestError, SamplingParams

# Chat without a model-specific template: role-tagged lines, then the assistant's turn. Stored with the
# model as tokenizer_config.json's "chat_template_varlen" when present (a str.format pattern per message).
DEFAULT_CHAT_TEMPLATE = {"message": "<|{role}|>\n{content}\n", "assistant_prefix": "<|assistant|>\n"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(e: APIError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


# ------------------------------------------------------------------------------------------ request bodies

def _field(body: dict, name: str, types: tuple, default: Any, check=None, rule: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        raise APIError(400, f"'{name}' must be {names}, got {type(value).__name__}", name)
    if check is not None and not check(value):
        raise APIError(400, f"'{name}' {rule}, got {value!r}", name)
    return value


def sampling_from(body: dict, cfg: ServeConfig, max_len: int) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, "'stop' must be a non-empty string or a list of them", "stop")
    if stop and len(stop) > cfg.max_stop:
        raise APIError(400, f"'stop' takes at most {cfg.max_stop} strings, got {len(stop)}", "stop")
    logprobs = body.get("logprobs")
    if body.get("top_logprobs") is not None or logprobs is True:  # chat's form: logprobs=true + top_logprobs
        logprobs = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= cfg.max_logprobs,
                          f"must be between 0 and {cfg.max_logprobs}") if logprobs is not False else None
    elif logprobs is False:
        logprobs = None
    elif logprobs is not None:
        logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= cfg.max_logprobs,
                          f"must be between 0 and {cfg.max_logprobs}")
    return SamplingParams(
        max_tokens=_field(body, "max_tokens", (int,), 16, lambda v: 0 < v <= max_len,
                          f"must be between 1 and the context length {max_len}"),
        temperature=float(_field(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]")),
        top_p=float(_field(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")),
        top_k=_field(body, "top_k", (int,), 0, lambda v: v >= 0, "must be >= 0"),
        seed=_field(body, "seed", (int,), None, lambda v: 0 <= v < 2 ** 63, "must be in [0, 2**63)"),
        n=_field(body, "n", (int,), 1, lambda v: 1 <= v <= cfg.max_n, f"must be between 1 and {cfg.max_n}"),
        stop=stop or [], logprobs=logprobs,
        ignore_eos=_field(body, "ignore_eos", (bool,), False),
    )


def chat_prompt(messages: Any, template: dict) -> str:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise APIError(400, f"messages[{i}] needs a role (system, user or assistant) and a string content",
                           "messages")
        parts.append(template["message"].format(role=m["role"], content=m["content"]))
    return "".join(parts) + template["assistant_prefix"]


# ------------------------------------------------------------------------------------------ the app

class ServerState:
    def __init__(self, name: str, cfg: ServeConfig, api_keys: list[str]):
        self.name, self.cfg, self.api_keys = name, cfg, api_keys
        self.engine: AsyncEngine | None = None
        self.load_error: str | None = None
        self.chat_template = DEFAULT_CHAT_TEMPLATE
        self.max_len = 0
        self.created = int(time.time())

    def authorized(self, header: str | None) -> bool:
        if not self.api_keys:
            return True
        given = (header or "").removeprefix("Bearer ").strip().encode()
        ok = False
        for key in self.api_keys:  # compare against every key: the time does not say which one nearly matched
            ok |= hmac.compare_digest(given, key.encode())
        return ok


def load_engine(state: ServerState, path: str | Path, device: str = "cpu") -> None:
    from ..checkpoint import load_model
    try:
        model, _, tokenizer = load_model(path, device)
        engine = Engine(model, tokenizer, state.cfg)
        conf = Path(path) / "tokenizer_config.json"
        if conf.is_file():
            custom = json.loads(conf.read_text()).get("chat_template_varlen")
            if isinstance(custom, dict):
                state.chat_template = {**DEFAULT_CHAT_TEMPLATE, **custom}
        state.max_len = engine.max_model_len
        state.engine = AsyncEngine(engine)
    except Exception as e:  # reported by /health; the process stays up to say why
        state.load_error = f"{type(e).__name__}: {e}"


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="varlen", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return error_response(e)

    def guard(request: HTTPRequest) -> None:
        # A dependency rather than middleware: Starlette's BaseHTTPMiddleware wraps the receive channel,
        # and then request.is_disconnected() never sees the client leave.
        if not state.authorized(request.headers.get("authorization")):
            raise APIError(401, "invalid or missing API key; send 'Authorization: Bearer KEY'",
                           kind="authentication_error")
        if state.engine is None:
            msg = state.load_error or "the model is still loading; retry shortly"
            raise APIError(503, msg, kind="server_error", headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "error" if state.load_error else "loading", "detail": state.load_error},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.engine.prometheus() if state.engine else "", media_type="text/plain")

    @app.get("/v1/models", dependencies=[Depends(guard)])
    async def models():
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                            "owned_by": "varlen", "max_model_len": state.max_len}]}

    async def read_body(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise APIError(400, "request body is not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e.msg} at position {e.pos}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != state.name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {state.name!r}", "model",
                           kind="not_found_error")
        return body

    @app.post("/v1/completions", dependencies=[Depends(guard)])
    async def completions(request: HTTPRequest):
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not (isinstance(prompt, str) or isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            raise APIError(400, "'prompt' must be a string (or one list of token ids)", "prompt")
        if not prompt:
            raise APIError(400, "'prompt' is empty", "prompt")
        return await run(request, body, prompt, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(guard)])
    async def chat(request: HTTPRequest):
        body = await read_body(request)
        prompt = chat_prompt(body.get("messages"), state.chat_template)
        if "max_completion_tokens" in body and "max_tokens" not in body:
            body["max_tokens"] = body["max_completion_tokens"]
        return await run(request, body, prompt, chat=True)

    async def run(request: HTTPRequest, body: dict, prompt, chat: bool):
        params = sampling_from(body, state.cfg, state.max_len)
        stream = _field(body, "stream", (bool,), False)
        opts = body.get("stream_options") or {}
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        n = params.n
        queues, ids = [], []
        try:
            for j in range(n):
                rid = f"{base}-{j}"
                seed = None if params.seed is None else params.seed + j
                single = SamplingParams(**{**params.__dict__, "n": 1, "seed": seed})
                queues.append(await state.engine.submit(prompt, single, rid))
                ids.append(rid)
        except (RequestError, QueueFull) as e:
            for rid in ids:
                state.engine.abort(rid)
            if isinstance(e, QueueFull):
                raise APIError(429, str(e), kind="rate_limit_error", headers={"Retry-After": "1"}) from None
            raise APIError(400, str(e), _param_of(str(e))) from None
        prompt_tokens = len(state.engine.engine.encode_prompt(prompt))
        meta = {"id": base, "created": int(time.time()), "model": state.name}
        if stream:
            return StreamingResponse(stream_events(queues, ids, meta, chat, include_usage, prompt_tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect(request, queues, ids, meta, chat, prompt_tokens)

    async def collect(request, queues, ids, meta, chat, prompt_tokens):
        results: dict[int, dict] = {}
        pending = {asyncio.ensure_future(_drain(q)): j for j, q in enumerate(queues)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, timeout=0.1)
                for task in done:
                    results[pending.pop(task)] = task.result()
                if pending and await request.is_disconnected():
                    raise asyncio.CancelledError
        except BaseException:
            for task in pending:
                task.cancel()
            for rid in ids:
                state.engine.abort(rid)
            raise
        choices, completion_tokens = [], 0
        for j in range(len(queues)):
            r = results[j]
            completion_tokens += r["tokens"]
            choice = {"index": j, "finish_reason": r["finish_reason"]}
            if chat:
                choice["message"] = {"role": "assistant", "content": r["text"]}
                if r["logprobs"] is not None:
                    choice["logprobs"] = {"content": [_chat_lp(lp, state) for lp in r["logprobs"]]}
            else:
                choice["text"] = r["text"]
                choice["logprobs"] = _completion_lp(r["logprobs"], state) if r["logprobs"] is not None else None
            choices.append(choice)
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def stream_events(queues, ids, meta, chat, include_usage, prompt_tokens):
        kind = "chat.completion.chunk" if chat else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()
        forwards = [asyncio.ensure_future(_forward(q, j, merged)) for j, q in enumerate(queues)]
        live, completion_tokens = len(queues), 0
        try:
            if chat:
                for j in range(len(queues)):
                    first = {"index": j, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield _sse({**meta, "object": kind, "choices": [first]})
            while live:
                j, out = await merged.get()
                if isinstance(out, Exception):
                    raise out
                completion_tokens += len(out.new_token_ids)
                if chat:
                    choice = {"index": j, "delta": {"content": out.new_text} if out.new_text else {},
                              "finish_reason": out.finish_reason}
                else:
                    choice = {"index": j, "text": out.new_text, "finish_reason": out.finish_reason,
                              "logprobs": _completion_lp(out.new_logprobs, state) if out.new_logprobs else None}
                if out.new_text or out.finished:
                    yield _sse({**meta, "object": kind, "choices": [choice]})
                live -= out.finished
            if include_usage:
                yield _sse({**meta, "object": kind, "choices": [],
                            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                      "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"
        finally:  # normal end, or the client went away (the response task is cancelled)
            for f in forwards:
                f.cancel()
            for rid in ids:
                state.engine.abort(rid)

    return app


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
            return {"text": "".join(text), "tokens": tokens, "finish_reason": out.finish_reason,
                    "logprobs": lps if has_lp else None}


async def _forward(q: asyncio.Queue, j: int, merged: asyncio.Queue) -> None:
    while True:
        out = await q.get()
        await merged.put((j, out))
        if isinstance(out, Exception) or isinstance(out, StepOutput) and out.finished:
            return


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _param_of(message: str) -> str | None:
    for name in ("max_tokens", "temperature", "top_p", "top_k", "logprobs", "stop", "prompt", "n"):
        if message.startswith(name) or f"'{name}'" in message or f"({name}" in message:
            return name
    return None


def _token_str(state: ServerState, token: int) -> str:
    return state.engine.engine.tokenizer.decode([token])


def _completion_lp(lps: list[dict], state: ServerState) -> dict:
    return {"tokens": [_token_str(state, lp["token_id"]) for lp in lps],
            "token_logprobs": [lp["logprob"] for lp in lps],
            "top_logprobs": [{_token_str(state, t): v for t, v in lp["top"]} for lp in lps],
            "text_offset": []}


def _chat_lp(lp: dict, state: ServerState) -> dict:
    return {"token": _token_str(state, lp["token_id"]), "logprob": lp["logprob"], "bytes": None,
            "top_logprobs": [{"token": _token_str(state, t), "logprob": v, "bytes": None} for t, v in lp["top"]]}


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 8000, api_keys: list[str] | None = None,
          cfg: ServeConfig | None = None, name: str | None = None, log_level: str = "info") -> None:
    """Listen at once (/health says 503 while the model loads), load the model in the background."""
    import uvicorn
    state = ServerState(name or Path(path).name, cfg or ServeConfig(), api_keys or [])
    threading.Thread(target=load_engine, args=(state, path), daemon=True).start()
    uvicorn.run(create_app(state), host=host, port=port, log_level=log_level)
