"""Soak: a real server on a real port, hammered by the real `openai` client and raw httpx.

A seeded mix of well-formed requests (completions and chat, streamed and not, random sampling settings,
extreme-but-valid values), streams the client abandons mid-way, and malformed bodies. The contract checked:
every well-formed request that is not abandoned ends with exactly its max_tokens tokens (ignore_eos), every
malformed one gets a 4xx with OpenAI's error body, nothing ever gets a 5xx, and afterwards the server is alive,
idle, and holds no more KV-cache blocks than before.
"""
from __future__ import annotations

import asyncio
import collections
import json
import random
import threading
import time
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from tests.test_server import KEY, Server, model_dir  # noqa: F401  (model_dir is a fixture used here)

# A short context and a tiny KV cache, so that 32 sequences of up to ~250 tokens do not all fit and the
# scheduler has to preempt: 0.0004 GiB is ~52 blocks of 16 tokens for the tiny test model (512 B per token).
SOAK_ARGS = ("--max-model-len", "256", "--kv-cache-gib", "0.0004")

PROMPTS = ["def main():", "import os\n", "class A:\n    def __init__(self):", "for i in range(10):",
           "# utility functions\n", "x = [1, 2, 3]\nprint(", "try:\n    pass\nexcept", "return self."]
SYSTEMS = ["You write Python.", "Answer briefly.", "You are a helpful assistant."]
USERS = ["A loop, please.", "Write a function.", "What is a dict?", "Sort a list.", "hi"]


class SoakServer(Server):
    """Server whose output is read continuously (a full pipe would stall the server under a soak) and kept
    for the assertion messages."""

    def __init__(self, model_dir, *extra):
        try:
            super().__init__(model_dir, *extra)
        except BaseException:  # never leave a server that did not come up running
            if getattr(self, "proc", None) is not None:
                self.proc.kill()
                self.proc.wait()
            raise
        self.log: collections.deque[str] = collections.deque(maxlen=300)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.append(line)

    def tail(self, n: int = 40) -> str:
        return "".join(list(self.log)[-n:])

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture
def soak_server(model_dir):  # noqa: F811
    s = SoakServer(model_dir, *SOAK_ARGS)
    yield s
    s.close()


@pytest.fixture
def plain_server(model_dir):  # noqa: F811
    s = SoakServer(model_dir)
    yield s
    s.close()


# ------------------------------------------------------------------------------------------ the cases

@dataclass
class Case:
    kind: str                      # "ok" | "extreme" | "cancel" | "malformed"
    label: str                     # category for the report
    endpoint: str                  # "completions" | "chat"
    stream: bool = False
    max_tokens: int = 0
    params: dict = field(default_factory=dict)   # openai-client keyword arguments (besides model/prompt)
    extra: dict = field(default_factory=dict)    # extra_body
    prompt: str = ""
    messages: list = field(default_factory=list)
    check: str = ""                # extra property to check: "greedy" | "one_token"
    cancel_after: int = 0
    body: object = None            # malformed: the raw body (dict or bytes)
    statuses: tuple = ()           # malformed: accepted statuses (empty = any 4xx)
    names: str = ""                # malformed: a field the error must name


@dataclass
class Result:
    case: Case
    ok: bool
    detail: str = ""
    status: int | None = None      # HTTP status when one was seen
    seconds: float = 0.0


def _comp(model, /, **kw):
    return {"model": model, "prompt": "x = 1", "max_tokens": 3, **kw}


def _chat(model, /, **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}


def malformed_cases(model: str) -> list[Case]:
    """(label, endpoint, body, accepted statuses (() = any 4xx), field the error must name)."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    rows = [
        ("temperature=5", "completions", _comp(model, temperature=5), (), ""),
        ("temperature=-1", "chat", _chat(model, temperature=-1), (), ""),
        ("temperature=1e308", "completions", _comp(model, temperature=1e308), (), ""),
        ("top_p=0", "chat", _chat(model, top_p=0), (), ""),
        ("top_p=1.5", "completions", _comp(model, top_p=1.5), (), ""),
        ("max_tokens=0", "completions", _comp(model, max_tokens=0), (), ""),
        ("max_tokens=-3", "chat", _chat(model, max_tokens=-3), (), ""),
        ("max_tokens=1e9", "completions", _comp(model, max_tokens=10 ** 9), (), ""),
        ("n=0", "chat", _chat(model, n=0), (), ""),
        ("logprobs=99", "completions", _comp(model, logprobs=99), (), ""),
        ("top_logprobs=99", "chat", _chat(model, logprobs=True, top_logprobs=99), (), ""),
        ("temperature='hot'", "chat", _chat(model, temperature="hot"), (), ""),
        ("max_tokens=1.5", "completions", _comp(model, max_tokens=1.5), (), ""),
        ("prompt=5", "completions", _comp(model, prompt=5), (), ""),
        ("messages='hi'", "chat", _chat(model, messages="hi"), (), ""),
        ("missing prompt", "completions", {"model": model, "max_tokens": 3}, (), ""),
        ("missing messages", "chat", {"model": model, "max_tokens": 3}, (), ""),
        ("invalid JSON", "completions", b'{"prompt": "x", "max_tokens": ', (), ""),
        ("invalid JSON", "chat", b"{'messages': [}", (), ""),
        ("invalid UTF-8", "completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}', (), ""),
        ("JSON list body", "completions", b'[{"prompt": "x", "max_tokens": 2}]', (), ""),
        ("JSON list body", "chat", b"[1, 2]", (), ""),
        ("unknown model", "completions", _comp(model, model="gpt-4o"), (400, 404), ""),
        ("unknown model", "chat", _chat(model, model="no-such-model"), (400, 404), ""),
        ("logit_bias key", "chat", _chat(model, logit_bias={"notanint": 1}), (), ""),
        ("logit_bias=1000", "completions", _comp(model, logit_bias={"5": 1000}), (), ""),
        ("tools", "chat", _chat(model, tools=[tool]), (400,), "tools"),
        ("functions", "chat", _chat(model, functions=[tool["function"]]), (400,), "functions"),
        ("suffix", "completions", _comp(model, suffix="\n"), (400,), "suffix"),
        ("empty messages", "chat", _chat(model, messages=[]), (), ""),
        ("role wizard", "chat", _chat(model, messages=[{"role": "wizard", "content": "hi"}]), (), ""),
    ]
    return [Case("malformed", f"malformed/{label}", ep, body=body, statuses=st, names=nm)
            for label, ep, body, st, nm in rows]


EXTREMES = [  # (label, openai-client kwargs, extra check)
    ("temperature=1e-40", {"temperature": 1e-40}, "greedy"),
    ("temperature=2,top_p=1e-9", {"temperature": 2.0, "top_p": 1e-9}, ""),
    ("penalties=+2/-2", {"presence_penalty": 2, "frequency_penalty": -2}, ""),
    ("logit_bias={5:+100}", {"logit_bias": {"5": 100}}, "one_token"),
    ("logit_bias={7:-100}", {"logit_bias": {"7": -100}}, ""),
]


def make_cases(total: int, seed: int, model: str) -> list[Case]:
    rng = random.Random(seed)
    bad, extremes = malformed_cases(model), list(EXTREMES)
    rng.shuffle(bad)
    rng.shuffle(extremes)
    n_bad = n_extreme = 0  # both lists are cycled through, so a long enough soak sends every one of them
    cases = []
    for _ in range(total):
        endpoint = rng.choice(["completions", "chat"])
        prompt = rng.choice(PROMPTS)
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": rng.choice(USERS)}]
        temperature = rng.choice([0, round(rng.uniform(0, 1.5), 3)])
        roll = rng.random()
        if roll < 0.20:  # a stream the client abandons after 1-3 chunks
            cases.append(Case("cancel", f"cancel/{endpoint}", endpoint, stream=True, max_tokens=rng.randint(60, 150),
                              params={"temperature": temperature}, extra={"ignore_eos": True}, prompt=prompt,
                              messages=messages, cancel_after=rng.randint(1, 3)))
            continue
        if roll < 0.31:  # ~11%: a 300-request soak sends each malformed kind about once
            cases.append(bad[n_bad % len(bad)])
            n_bad += 1
            continue
        stream = rng.random() < 0.5
        max_tokens = rng.randint(1, 24)
        case = Case("ok", f"ok/{endpoint}/{'stream' if stream else 'whole'}", endpoint, stream=stream,
                    max_tokens=max_tokens, extra={"ignore_eos": True}, prompt=prompt, messages=messages)
        if roll < 0.43:  # extreme but valid
            label, kw, check = extremes[n_extreme % len(extremes)]
            n_extreme += 1
            case.kind, case.label, case.params, case.check = "extreme", f"extreme/{label}", dict(kw), check
            if check == "one_token":  # read the tokens back through logprobs
                case.stream = False
                case.params.update({"logprobs": 1} if endpoint == "completions" else
                                   {"logprobs": True, "top_logprobs": 1})
            cases.append(case)
            continue
        case.params["temperature"] = temperature
        if rng.random() < 0.3:
            case.params["seed"] = rng.randrange(2 ** 31)
        if rng.random() < 0.3:
            case.params["top_p"] = round(rng.uniform(0.05, 1.0), 3)
        if rng.random() < 0.3:
            case.extra["top_k"] = rng.randint(0, 50)
        if rng.random() < 0.25:
            k = rng.randint(0, 5)
            case.params.update({"logprobs": k} if endpoint == "completions" else {"logprobs": True, "top_logprobs": k})
        if not stream and rng.random() < 0.15:
            case.params["n"] = 2
        cases.append(case)
    return cases


# ------------------------------------------------------------------------------------------ running them

class Ctx:
    def __init__(self, server: Server, model: str, timeout: float = 120):
        self.server, self.model = server, model
        self.client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=timeout)
        self.http = httpx.AsyncClient(base_url=server.url, timeout=timeout,
                                      limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
                                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})

    async def aclose(self):
        await self.client.close()
        await self.http.aclose()


def _create(ctx: Ctx, case: Case, **override):
    kw = {"model": ctx.model, "max_tokens": case.max_tokens, **case.params, "extra_body": case.extra, **override}
    if kw.get("stream"):
        kw["stream_options"] = {"include_usage": True}
    if case.endpoint == "completions":
        return ctx.client.completions.create(prompt=case.prompt, **kw)
    return ctx.client.chat.completions.create(messages=case.messages, **kw)


def _choice_text(c, chat: bool) -> str:
    return (c.message.content or "") if chat else c.text


def _tokens(c, chat: bool) -> list[str] | None:
    if chat:
        return None if c.logprobs is None or c.logprobs.content is None else [t.token for t in c.logprobs.content]
    return None if c.logprobs is None else list(c.logprobs.tokens)


async def generate(ctx: Ctx, case: Case) -> tuple[str, list[str] | None]:
    """Run a well-formed case to the end; returns (text of choice 0, its tokens if logprobs) or raises
    AssertionError naming what broke the contract."""
    chat = case.endpoint == "chat"
    n = case.params.get("n", 1)
    if not case.stream:
        r = await _create(ctx, case)
        assert len(r.choices) == n, f"{len(r.choices)} choices, want {n}"
        assert r.usage is not None and r.usage.completion_tokens == n * case.max_tokens, \
            f"usage {r.usage}, want completion_tokens {n * case.max_tokens}"
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, f"usage {r.usage}"
        for c in r.choices:
            assert c.finish_reason == "length", f"finish_reason {c.finish_reason!r}, want 'length'"
        first = sorted(r.choices, key=lambda c: c.index)[0]
        tokens = _tokens(first, chat)
        if case.params.get("logprobs") not in (None, False):
            assert tokens is not None and len(tokens) == case.max_tokens, \
                f"{None if tokens is None else len(tokens)} logprob entries, want {case.max_tokens}"
        return _choice_text(first, chat), tokens
    stream = await _create(ctx, case, stream=True)
    text, usage, finish = [], None, None
    async with stream:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                text.append((c.delta.content or "") if chat else c.text)
                finish = c.finish_reason or finish
    assert usage is not None, "no usage chunk though stream_options.include_usage was set"
    assert usage.completion_tokens == case.max_tokens, f"usage {usage}, want completion_tokens {case.max_tokens}"
    assert finish == "length", f"finish_reason {finish!r}, want 'length'"
    return "".join(text), None


async def run_case(ctx: Ctx, case: Case) -> Result:
    t0 = time.perf_counter()
    try:
        if case.kind == "malformed":
            res = await run_malformed(ctx, case)
        elif case.kind == "cancel":
            res = await run_cancel(ctx, case)
        else:
            text, tokens = await generate(ctx, case)
            if case.check == "greedy":  # temperature 1e-40 must be greedy: the same text as temperature 0
                want, _ = await generate(ctx, Case("ok", "", case.endpoint, stream=False, max_tokens=case.max_tokens,
                                                   params={"temperature": 0}, extra=case.extra, prompt=case.prompt,
                                                   messages=case.messages))
                assert text == want, f"temperature 1e-40 gave {text!r}, temperature 0 gave {want!r}"
            if case.check == "one_token":  # +100 on one token: it is the only token ever chosen
                assert tokens and len(set(tokens)) == 1, f"logit_bias +100 on one token, got tokens {tokens}"
            res = Result(case, True, status=200)
    except openai.APIStatusError as e:
        res = Result(case, False, f"HTTP {e.status_code}: {e.response.text[:300]}", e.status_code)
    except AssertionError as e:
        res = Result(case, False, str(e)[:400])
    except Exception as e:  # a broken connection, a stream cut off mid-way, a timeout
        res = Result(case, False, f"{type(e).__name__}: {str(e)[:300]}")
    res.seconds = time.perf_counter() - t0
    return res


async def run_cancel(ctx: Ctx, case: Case) -> Result:
    stream = await _create(ctx, case, stream=True)
    got = 0
    try:
        async for _ in stream:
            got += 1
            if got >= case.cancel_after:
                break
    finally:
        await stream.close()  # the client goes away mid-stream
    if got < case.cancel_after:
        return Result(case, False, f"stream of {case.max_tokens} tokens ended after {got} chunks", 200)
    return Result(case, True, status=200)


def error_body_problem(r: httpx.Response) -> str:
    """'' when r carries OpenAI's error body {"error": {"message": str, "type": str, "param", "code"}}."""
    try:
        err = r.json()["error"]
    except Exception:
        return f"no JSON error body: {r.text[:200]!r}"
    if not isinstance(err, dict):
        return f"'error' is not an object: {err!r}"
    if not (isinstance(err.get("message"), str) and err["message"]):
        return f"error.message missing or empty: {err!r}"
    if not isinstance(err.get("type"), str):
        return f"error.type missing or not a string: {err!r}"
    if "param" not in err or "code" not in err:
        return f"error lacks 'param' or 'code': {err!r}"
    return ""


async def run_malformed(ctx: Ctx, case: Case) -> Result:
    path = "/v1/completions" if case.endpoint == "completions" else "/v1/chat/completions"
    content = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
    r = await ctx.http.post(path, content=content)
    if not 400 <= r.status_code < 500:
        return Result(case, False, f"HTTP {r.status_code}, want 4xx: {r.text[:200]}", r.status_code)
    if case.statuses and r.status_code not in case.statuses:
        return Result(case, False, f"HTTP {r.status_code}, want {case.statuses}: {r.text[:200]}", r.status_code)
    problem = error_body_problem(r)
    if not problem and case.names:
        err = r.json()["error"]
        if case.names not in f"{err.get('param')} {err['message']}":
            problem = f"error does not name {case.names!r}: {err!r}"
    return Result(case, not problem, problem, r.status_code)


async def _drive(server: Server, cases: list[Case], concurrency: int, model: str) -> list[Result]:
    ctx = Ctx(server, model)
    todo: asyncio.Queue = asyncio.Queue()
    for c in cases:
        todo.put_nowait(c)
    results: list[Result] = []

    async def worker():
        while True:
            try:
                case = todo.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await run_case(ctx, case))

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await ctx.aclose()
    return results


def summarize(results: list[Result]) -> str:
    by = collections.defaultdict(lambda: [0, 0])
    for r in results:
        by[r.case.label][0] += 1
        by[r.case.label][1] += r.ok
    kinds = collections.defaultdict(lambda: [0, 0])
    for r in results:
        kinds[r.case.kind][0] += 1
        kinds[r.case.kind][1] += r.ok
    statuses = collections.Counter(r.status for r in results)
    lines = ["by kind (passed/total): " + ", ".join(f"{k} {p}/{t}" for k, (t, p) in sorted(kinds.items())),
             "statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=lambda kv: str(kv[0]))),
             "by category (passed/total):"]
    lines += [f"  {label:<40} {p}/{t}" for label, (t, p) in sorted(by.items())]
    failures = [r for r in results if not r.ok]
    if failures:
        lines.append(f"first failures ({len(failures)} in all):")
        seen = collections.Counter()
        for r in failures:
            seen[r.case.label] += 1
            if seen[r.case.label] <= 2:
                lines.append(f"  [{r.case.label}] {r.detail}")
    return "\n".join(lines)


def run_soak(server: SoakServer, total: int, concurrency: int, seed: int) -> list[Result]:
    """Drive `total` requests, `concurrency` at a time, and assert the soak's contract."""
    model = server.client.models.list().data[0].id
    cases = make_cases(total, seed, model)
    server.wait_idle()
    before = server.metric("varlen_kv_blocks_used")
    t0 = time.perf_counter()
    results = asyncio.run(_drive(server, cases, concurrency, model))
    elapsed = time.perf_counter() - t0
    report = f"{total} requests, concurrency {concurrency}, seed {seed}, {elapsed:.1f} s\n" + summarize(results)
    alive = server.alive()
    assert alive, f"server died during the soak\n{report}\n--- server output ---\n{server.tail()}"

    five = [r for r in results if r.status is not None and r.status >= 500]
    assert not five, f"{len(five)} responses were 5xx\n{report}\n--- server output ---\n{server.tail()}"
    bad = [r for r in results if r.case.kind == "malformed" and not r.ok]
    assert not bad, f"{len(bad)} malformed requests were not answered 4xx + error body\n{report}"
    broken = [r for r in results if r.case.kind != "malformed" and not r.ok]
    assert not broken, f"{len(broken)} well-formed requests failed\n{report}\n--- server output ---\n{server.tail()}"
    try:
        server.wait_idle(timeout=30)
    except AssertionError:
        pass  # reported just below with the numbers
    after = server.metric("varlen_kv_blocks_used")
    running = server.metric("varlen_requests_running")
    assert after == before and running == 0, \
        f"KV blocks used {before} before the soak, {after} after ({running} still running)\n{report}"
    assert server.alive(), f"server died after the soak\n{report}"
    print(report)
    return results


# ------------------------------------------------------------------------------------------ the tests

def test_soak_300(soak_server):
    run_soak(soak_server, total=300, concurrency=32, seed=300)


@pytest.mark.slow
def test_soak_1000(soak_server):
    run_soak(soak_server, total=1000, concurrency=64, seed=1000)


def test_one_bad_request_does_not_fail_others(plain_server):
    """Eight long streams are running when a request arrives whose sampling settings (a temperature of 1e-40:
    logits / T overflow to inf, and inf - inf is NaN in the softmax) once crashed the step shared by the
    whole batch; all nine must finish normally, and the odd one must be greedy."""
    server = plain_server
    LONG = 150
    model = server.client.models.list().data[0].id

    async def main():
        ctx = Ctx(server, model)
        started = [asyncio.Event() for _ in range(8)]

        async def long_stream(j: int) -> int:
            chat = j % 2 == 1
            kw = dict(model=model, max_tokens=LONG, stream=True, stream_options={"include_usage": True},
                      temperature=0.7 + 0.1 * (j % 4), top_p=0.95, seed=j,
                      extra_body={"ignore_eos": True, "top_k": 40})
            if chat:
                stream = await ctx.client.chat.completions.create(
                    messages=[{"role": "user", "content": f"Write function number {j}."}], **kw)
            else:
                stream = await ctx.client.completions.create(prompt=f"def f{j}(x):", **kw)
            usage = None
            async with stream:
                async for chunk in stream:
                    if any((c.delta.content if chat else c.text) for c in chunk.choices):
                        started[j].set()
                    usage = chunk.usage or usage
            return usage.completion_tokens if usage else -1

        async def odd_one():
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
            running = server.metric("varlen_requests_running")
            odd = Case("extreme", "odd", "completions", max_tokens=16, prompt="import sys\n",
                       params={"temperature": 1e-40, "top_p": 0.9, "seed": 7, "logprobs": 2},
                       extra={"ignore_eos": True, "top_k": 5})
            text, _ = await generate(ctx, odd)
            want, _ = await generate(ctx, Case("ok", "", "completions", max_tokens=16, prompt="import sys\n",
                                               params={"temperature": 0}, extra={"ignore_eos": True}))
            return running, text, want

        try:
            return await asyncio.gather(*(long_stream(j) for j in range(8)), odd_one(), return_exceptions=True)
        finally:
            await ctx.aclose()

    *streams, odd = asyncio.run(main())
    problems = [f"stream {j}: {r!r}" if isinstance(r, BaseException) else f"stream {j}: {r} tokens, want {LONG}"
                for j, r in enumerate(streams) if r != LONG]
    if isinstance(odd, BaseException):
        problems.append(f"the temperature=1e-40 request: {odd!r}")
    else:
        running, text, want = odd
        assert running >= 1, "the long streams had finished before the odd request was sent"
        if text != want:
            problems.append(f"temperature 1e-40 gave {text!r}, temperature 0 gave {want!r}")
    assert not problems, "\n".join(problems) + f"\n--- server output ---\n{server.tail()}"
    server.wait_idle()
    assert server.alive()
