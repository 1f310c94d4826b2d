"""The engine on its own thread, fed by asyncio callers: one step loop, many concurrent HTTP requests.

The Engine is not thread-safe, so every call into it happens on the loop thread; callers send commands
(add, abort) through a queue and get their outputs back on an asyncio.Queue of their own event loop.

A request that fails in a step fails alone (Engine.step). Anything else that escapes a step means the
engine's state can no longer be trusted: the loop fails every request in flight, marks itself dead (so
/health answers 503 and new requests are refused) and calls `on_death`, which stops the server so that the
process exits non-zero and a supervisor can restart it.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine import Engine, StepOutput
from .request import SamplingParams
from .speculate import SpecStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
log = logging.getLogger("varlen.serve")


class EngineDead(RuntimeError):
    """The engine loop has stopped (HTTP 503); the message says why."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    submitted: float
    last_token: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, on_death: Callable[[str], None] | None = None):
        self.engine, self.on_death = engine, on_death
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.streams: dict[str, _Stream] = {}
        self.dead: str | None = None  # why the loop stopped, once it has
        self._stop = False
        # One registry per engine (no process-global metrics): /metrics renders exactly this.
        self.registry = CollectorRegistry()
        self.ttft = Histogram("varlen_time_to_first_token_seconds", "Time from request to first token.",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("varlen_inter_token_latency_seconds",
                             "Time between a request's stream events (several tokens each when speculating).",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("varlen_generation_tokens", "Tokens generated.", registry=self.registry)
        self.finished = Counter("varlen_requests_finished", "Requests finished, by reason.", ["reason"],
                                registry=self.registry)
        self.registry.register(_EngineState(self))
        self.thread = threading.Thread(target=self._run, name="varlen-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ callers (any thread / event loop)
    async def submit(self, prompt, params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Queue a request; raises the engine's RequestError / QueueFull, or EngineDead. Outputs arrive on the
        returned queue: StepOutputs, or an exception if the engine dies."""
        if self.dead:
            raise EngineDead(self.dead)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        outputs: asyncio.Queue = asyncio.Queue()
        self.commands.put(("add", prompt, params, request_id, loop, outputs, done))
        self.wake.set()
        await done
        return outputs

    def abort(self, request_id: str) -> None:
        self.commands.put(("abort", request_id))
        self.wake.set()

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop thread
    def _command(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            if self.streams.pop(cmd[1], None) is not None:
                self.engine.abort(cmd[1])
                self.finished.labels("abort").inc()
            return
        _, prompt, params, request_id, loop, outputs, done = cmd
        if self.dead:
            loop.call_soon_threadsafe(_settle, done, None, EngineDead(self.dead))
            return
        try:
            self.engine.add_request(prompt, params, request_id)
        except Exception as e:  # handed to the caller, who turns it into a 4xx
            loop.call_soon_threadsafe(_settle, done, None, e)
            return
        self.streams[request_id] = _Stream(loop, outputs, time.perf_counter())
        loop.call_soon_threadsafe(_settle, done, request_id, None)

    def _run(self) -> None:
        try:
            while not self._stop:
                while True:
                    try:
                        self._command(self.commands.get_nowait())
                    except queue.Empty:
                        break
                if not self.engine.has_unfinished():
                    self.wake.wait(0.05)
                    self.wake.clear()
                    continue
                outs = self.engine.step()
                now = time.perf_counter()
                for out in outs:
                    self._deliver(out, now)
        except BaseException as e:  # noqa: BLE001 (never die silently)
            self._die(e)

    def _die(self, error: BaseException) -> None:
        self.dead = f"the engine stopped: {type(error).__name__}: {error}"
        log.error("%s\n%s", self.dead, "".join(traceback.format_exception(error)))
        failure = EngineDead(self.dead)
        for s in self.streams.values():
            s.loop.call_soon_threadsafe(s.outputs.put_nowait, failure)
        self.streams.clear()
        while True:  # callers waiting on an "add" would otherwise wait forever
            try:
                cmd = self.commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                cmd[4].call_soon_threadsafe(_settle, cmd[6], None, failure)
        if self.on_death is not None:
            self.on_death(self.dead)

    def _deliver(self, out: StepOutput, now: float) -> None:
        s = self.streams.get(out.request_id)
        if s is None:
            return  # aborted meanwhile
        if out.new_token_ids:
            self.tokens.inc(len(out.new_token_ids))
            if s.last_token is None:
                self.ttft.observe(now - s.submitted)
            else:
                self.itl.observe(now - s.last_token)
            s.last_token = now
        if out.finished:
            self.streams.pop(out.request_id, None)
            self.finished.labels(out.finish_reason).inc()
        s.loop.call_soon_threadsafe(s.outputs.put_nowait, out)


class _EngineState:
    """Gauges and counters read off the engine when /metrics is scraped."""

    def __init__(self, owner: AsyncEngine):
        self.owner = owner

    def collect(self):
        e = self.owner.engine
        b = e.blocks
        for name, help_text, value in [
            ("varlen_requests_running", "Requests in the running batch.", len(e.scheduler.running)),
            ("varlen_requests_waiting", "Requests waiting to be admitted.", len(e.scheduler.waiting)),
            ("varlen_kv_blocks_used", "KV-cache blocks held by requests.", b.num_used_blocks),
            ("varlen_kv_blocks_total", "KV-cache blocks in all.", b.num_blocks),
            ("varlen_prefix_cache_hit_rate", "Share of looked-up prompt blocks found in the prefix cache.",
             getattr(b, "cache_hit_rate", 0.0)),
            ("varlen_engine_alive", "1 while the engine loop runs, 0 once it has stopped.",
             0 if self.owner.dead else 1),
        ]:
            yield GaugeMetricFamily(name, help_text, value=value)
        yield CounterMetricFamily("varlen_prefix_cache_hit_blocks", "Blocks reused from the prefix cache.",
                                  value=b.num_cache_hits)
        yield CounterMetricFamily("varlen_prefix_cache_query_blocks",
                                  "Prompt blocks looked up in the prefix cache.",
                                  value=getattr(b, "num_cache_queries", 0))
        if e.num_speculative:
            yield from speculative_metrics(e.spec_stats)


def speculative_metrics(s: SpecStats):
    """Per MTP head (label head="j"): drafts verified, drafts accepted and their ratio; tokens per verify step."""
    heads = [str(j) for j in range(1, len(s.drafted) + 1)]
    for family, name, help_text, values in [
        (CounterMetricFamily, "varlen_spec_draft_tokens", "Draft tokens of head j verified.", s.drafted),
        (CounterMetricFamily, "varlen_spec_accepted_tokens", "Draft tokens of head j accepted.", s.accepted),
        (GaugeMetricFamily, "varlen_spec_acceptance_rate", "Share of head j's verified drafts accepted.",
         s.acceptance),
    ]:
        metric = family(name, help_text, labels=["head"])
        for head, v in zip(heads, values):
            metric.add_metric([head], v)
        yield metric
    yield CounterMetricFamily("varlen_spec_verify_steps", "Request-steps that verified drafts.",
                              value=s.verify_steps)
    yield GaugeMetricFamily("varlen_spec_tokens_per_step",
                            "Mean tokens a verify step emits per request (1 + accepted drafts).",
                            value=s.tokens_per_step)


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
