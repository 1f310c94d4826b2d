"""The engine on its own thread, fed by asyncio callers: one step loop, many concurrent HTTP requests.

The Engine is not thread-safe, so every call into it happens on the loop thread; callers send commands
(add, abort) through a queue and get their outputs back on an asyncio.Queue of their own event loop.
"""
from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from .engine import Engine, StepOutput
from .request import SamplingParams
from .speculate import SpecStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.total += value
        self.n += 1

    def prometheus(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        acc = 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            lines.append(f'{name}_bucket{{le="{b}"}} {acc}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return lines


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    submitted: float
    last_token: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.commands: queue.SimpleQueue = queue.SimpleQueue()
        self.wake = threading.Event()
        self.streams: dict[str, _Stream] = {}
        self.ttft, self.itl = Histogram(), Histogram()
        self.tokens_generated = 0
        self.finished: dict[str, int] = {}
        self.errors = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="varlen-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ callers (any thread / event loop)
    async def submit(self, prompt, params: SamplingParams, request_id: str) -> asyncio.Queue:
        """Queue a request; raises the engine's RequestError / QueueFull. Outputs arrive on the returned queue."""
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
                self.finished["abort"] = self.finished.get("abort", 0) + 1
            return
        _, prompt, params, request_id, loop, outputs, done = cmd
        try:
            self.engine.add_request(prompt, params, request_id)
        except Exception as e:  # handed to the caller, who turns it into a 4xx
            loop.call_soon_threadsafe(_settle, done, None, e)
            return
        self.streams[request_id] = _Stream(loop, outputs, time.perf_counter())
        loop.call_soon_threadsafe(_settle, done, request_id, None)

    def _run(self) -> None:
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
            try:
                outs = self.engine.step()
            except Exception as e:  # a bug, not a bad request: fail the running requests, keep serving
                self.errors += 1
                for rid in list(self.streams):
                    self.engine.abort(rid)
                    s = self.streams.pop(rid)
                    s.loop.call_soon_threadsafe(s.outputs.put_nowait, e)
                continue
            now = time.perf_counter()
            for out in outs:
                self._deliver(out, now)

    def _deliver(self, out: StepOutput, now: float) -> None:
        s = self.streams.get(out.request_id)
        if s is None:
            return  # aborted meanwhile
        if out.new_token_ids:
            self.tokens_generated += len(out.new_token_ids)
            if s.last_token is None:
                self.ttft.observe(now - s.submitted)
            else:
                self.itl.observe(now - s.last_token)
            s.last_token = now
        if out.finished:
            self.streams.pop(out.request_id, None)
            self.finished[out.finish_reason] = self.finished.get(out.finish_reason, 0) + 1
        s.loop.call_soon_threadsafe(s.outputs.put_nowait, out)

    # ------------------------------------------------------------------ /metrics
    def prometheus(self) -> str:
        e = self.engine
        lines = [
            "# HELP varlen_requests_running Requests in the running batch.", "# TYPE varlen_requests_running gauge",
            f"varlen_requests_running {len(e.scheduler.running)}",
            "# HELP varlen_requests_waiting Requests waiting to be admitted.", "# TYPE varlen_requests_waiting gauge",
            f"varlen_requests_waiting {len(e.scheduler.waiting)}",
            "# HELP varlen_kv_blocks_used KV-cache blocks held by requests.", "# TYPE varlen_kv_blocks_used gauge",
            f"varlen_kv_blocks_used {e.blocks.num_used_blocks}",
            "# HELP varlen_kv_blocks_total KV-cache blocks in all.", "# TYPE varlen_kv_blocks_total gauge",
            f"varlen_kv_blocks_total {e.blocks.num_blocks}",
            "# HELP varlen_prefix_cache_hit_blocks Blocks reused from the prefix cache.",
            "# TYPE varlen_prefix_cache_hit_blocks counter",
            f"varlen_prefix_cache_hit_blocks {e.blocks.num_cache_hits}",
            "# HELP varlen_generation_tokens_total Tokens generated.", "# TYPE varlen_generation_tokens_total counter",
            f"varlen_generation_tokens_total {self.tokens_generated}",
            "# HELP varlen_requests_finished_total Requests finished, by reason.",
            "# TYPE varlen_requests_finished_total counter",
        ]
        lines += [f'varlen_requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
        lines += self.ttft.prometheus("varlen_time_to_first_token_seconds", "Time from request to first token.")
        lines += self.itl.prometheus("varlen_inter_token_latency_seconds",
                                     "Time between a request's stream events (several tokens each when speculating).")
        if e.num_speculative:
            lines += speculative_metrics(e.spec_stats)
        return "\n".join(lines) + "\n"


def speculative_metrics(s: SpecStats) -> list[str]:
    """Per MTP head (label head="j"): drafts verified, drafts accepted and their ratio; tokens per verify step."""
    lines = []
    for name, kind, help_text, values in [
        ("varlen_spec_draft_tokens_total", "counter", "Draft tokens of head j verified.", s.drafted),
        ("varlen_spec_accepted_tokens_total", "counter", "Draft tokens of head j accepted.", s.accepted),
        ("varlen_spec_acceptance_rate", "gauge", "Share of head j's verified drafts accepted.", s.acceptance),
    ]:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        lines += [f'{name}{{head="{j}"}} {v:.6g}' for j, v in enumerate(values, start=1)]
    return lines + [
        "# HELP varlen_spec_verify_steps_total Request-steps that verified drafts.",
        "# TYPE varlen_spec_verify_steps_total counter", f"varlen_spec_verify_steps_total {s.verify_steps}",
        "# HELP varlen_spec_tokens_per_step Mean tokens a verify step emits per request (1 + accepted drafts).",
        "# TYPE varlen_spec_tokens_per_step gauge", f"varlen_spec_tokens_per_step {s.tokens_per_step:.6g}",
    ]


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
