"""Serving throughput: varlen's engine against Hugging Face `generate` and transformers' continuous batching.

One run, one long-tailed workload built from the stdlib corpus (prompts are prefixes of stdlib documents;
prompt lengths and max_tokens both drawn lognormal, clipped), the same weights for every method, greedy,
EOS ignored everywhere so every request produces exactly its own max_tokens (the useful output tokens):

  varlen      varlen.serve.engine.Engine: continuous batching, paged KV cache, chunked prefill
  hf_padded   LlamaForCausalLM.generate (sdpa), static batches of --hf-batch requests in arrival order,
              left-padded; a batch runs to its largest max_tokens (only each request's own count as useful)
  hf_cb       transformers' continuous batching: one manager (init_continuous_batching), warmed up and kept
              alive for the whole workload, requests added with add_request, results read with get_result
  varlen_conc the varlen engine again with max_num_seqs = --clients: the HTTP run's concurrency, so the
              gap between it and http is the cost of the HTTP path itself
  http        `varlen serve` (the real server, a subprocess) driven by --clients threads, each with its own
              `openai.OpenAI` client, streaming /v1/completions with token-id prompts

Offline batch for varlen / hf_padded / hf_cb: every request arrives at t=0 (the clock starts just before
the first request is submitted); TTFT is when a request's first output token exists, latency when its result
is in the caller's hands (for hf_padded: when the generate call of its batch returns). The HTTP run keeps at
most --clients requests in flight, so its latencies count from each request's own send time.

Weights: by default a deterministic random model of the tiny preset's shape (seeded, nothing trained);
--model DIR uses a trained varlen run/checkpoint or HF Llama directory instead. Both are written once as a
varlen directory and a HF directory, and every method (one fresh process each) loads its side from them.

    .venv/bin/python benchmarks/serve_throughput.py                 # 200 requests, all four methods
    .venv/bin/python benchmarks/serve_throughput.py --requests 16 --methods varlen,hf_padded   # smoke test
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from machine import machine_info, matrix_units
from varlen.config import Config, ModelConfig, ServeConfig

METHODS = ("varlen", "hf_padded", "hf_cb", "varlen_conc", "http")
LABELS = {
    "varlen": "varlen Engine (continuous batching)",
    "hf_padded": "HF generate, left-padded static batches",
    "hf_cb": "transformers continuous batching",
    "http": "varlen serve over HTTP, openai clients",
}
API_KEY = "sk-serve-bench"


def run_keys(methods: list[str], args) -> list[str]:
    """One key per timed run: hf_padded once per --hf-batch size, hf_cb once per --hf-cb-sizes choice."""
    keys = []
    for m in methods:
        if m == "hf_padded":
            keys += [f"hf_padded_b{int(b)}" for b in str(args.hf_batch).split(",")]
        elif m == "hf_cb":
            keys += [f"hf_cb_{c}" for c in args.hf_cb_sizes.split(",")]
        elif m == "varlen_conc":
            keys.append(f"varlen_c{args.clients}")
        else:
            keys.append(m)
    return keys


def split_key(key: str):
    if key.startswith("hf_padded_b"):
        return "hf_padded", int(key[len("hf_padded_b"):])
    if key.startswith("hf_cb_"):
        return "hf_cb", key[len("hf_cb_"):]
    if key.startswith("varlen_c"):
        return "varlen", int(key[len("varlen_c"):])
    return key, None


def label(key: str, args=None) -> str:
    method, variant = split_key(key)
    if method == "hf_padded":
        return f"HF generate, left-padded static batches of {variant}"
    if method == "hf_cb":
        return f"transformers continuous batching ({variant} sizes)"
    if method == "varlen" and variant is not None:
        return f"varlen Engine, max_num_seqs {variant} (the HTTP run's concurrency)"
    if method == "http":
        return f"varlen serve over HTTP, {args.clients if args else ''} streaming openai clients".replace("  ", " ")
    if method == "varlen" and args is not None:
        return f"varlen Engine (continuous batching, max_num_seqs {args.max_num_seqs})"
    return LABELS[method]


# ----------------------------------------------------------------------------------------------- workload

@dataclass
class Workload:
    prompts: list[list[int]]      # token ids, each a prefix of one stdlib document (starting with its BOS)
    max_tokens: list[int]
    docs: list[int]               # document index of each prompt
    warmup_prompts: list[list[int]]
    warmup_max_tokens: list[int]
    varlen_dir: str               # the same weights, varlen format
    hf_dir: str                   # ... and Hugging Face format
    serve: dict                   # ServeConfig fields shared by the engine, the server and (sizes of) hf_cb
    eod_id: int

    @property
    def n(self) -> int:
        return len(self.prompts)

    @property
    def useful_tokens(self) -> int:
        return int(sum(self.max_tokens))


def lognormal_ints(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def build_workload(store, args, varlen_dir: str, hf_dir: str, eod_id: int, max_model_len: int) -> Workload:
    """Seeded: prompt lengths and max_tokens lognormal (long right tail), clipped so prompt + max_tokens fits
    max_model_len; each prompt is the start of a random document at least that long."""
    rng = np.random.default_rng(args.seed)
    n = args.requests + args.warmup_requests
    plen = lognormal_ints(rng, n, args.prompt_median, args.prompt_sigma, args.prompt_min, args.prompt_max)
    mtok = lognormal_ints(rng, n, args.max_tokens_median, args.max_tokens_sigma, args.max_tokens_min,
                          args.max_tokens_max)
    mtok = np.minimum(mtok, max_model_len - plen)
    lengths = store.lengths
    prompts, docs = [], []
    for p in plen:
        candidates = np.flatnonzero(lengths >= p)
        d = int(rng.choice(candidates))
        docs.append(d)
        prompts.append([int(t) for t in store.doc(d)[:p]])
    w = args.warmup_requests  # the warm-up requests come first in the stream, shortened
    serve = {"kv_cache_gib": args.kv_cache_gib, "max_num_seqs": args.max_num_seqs,
             "max_num_batched_tokens": args.max_num_batched_tokens, "max_model_len": max_model_len,
             "block_size": args.block_size}
    return Workload(prompts[w:], [int(m) for m in mtok[w:]], docs[w:],
                    [p[:32] for p in prompts[:w]], [min(8, int(m)) for m in mtok[:w]],
                    varlen_dir, hf_dir, serve, eod_id)


def make_weights(args, out: Path):
    """(model, cfg, tokenizer, store): a trained checkpoint (--model) or seeded random tiny-shaped weights."""
    from varlen.checkpoint import load_model
    from varlen.data.corpus import Corpus
    from varlen.data.tokens import prepare
    from varlen.model.transformer import Transformer

    if args.model:
        model, cfg, tok = load_model(args.model)
        # Prompts from the stdlib corpus tokenized with the model's own tokenizer (cached like any store).
        _, store = prepare(Corpus("stdlib"), tok.vocab_size, args.cache_dir, tokenizer=tok)
        if args.max_model_len > cfg.model.max_seq_len:  # RoPE runs at any length; the limit is a config field
            cfg.model.max_seq_len = args.max_model_len
            model.cfg.max_seq_len = args.max_model_len
        source = f"checkpoint {args.model}"
    else:
        tok, store = prepare(Corpus("stdlib"), args.vocab, args.cache_dir)
        mcfg = ModelConfig(vocab_size=tok.vocab_size, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                           n_kv_head=args.n_kv_head, max_seq_len=args.max_model_len)
        cfg = Config(model=mcfg)
        torch.manual_seed(args.seed)
        model = Transformer(mcfg).eval()
        source = f"random init (torch.manual_seed({args.seed}), varlen's init: normal std 0.02), untrained"
    from varlen.checkpoint.hf_llama import save_hf, save_varlen
    varlen_dir = save_varlen(model, cfg, tok, out / "varlen_model")
    hf_dir = save_hf(model, cfg, tok, out / "hf_model")
    return model, cfg, tok, store, str(varlen_dir), str(hf_dir), source


# ------------------------------------------------------------------------------------------------ methods

def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


class Clock:
    """Wall time plus how much CPU the rest of the machine used meanwhile (other_cpu_cores)."""

    def __init__(self, own_pids=()):
        self.own = [psutil.Process()] + [psutil.Process(p) for p in own_pids]

    def _own_cpu(self) -> float:
        total = 0.0
        for p in self.own:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def start(self) -> float:
        self.load = os.getloadavg()[0]
        self.busy0, self.own0 = cpu_busy_seconds(), self._own_cpu()
        self.t0 = time.perf_counter()
        return self.t0

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        own = self._own_cpu() - self.own0
        busy = cpu_busy_seconds() - self.busy0
        return {"seconds": wall, "load_avg_1min_before": self.load, "own_cpu_cores": own / wall,
                "other_cpu_cores": max(0.0, (busy - own) / wall)}


def run_varlen(work: Workload, args, max_num_seqs: int | None = None) -> dict:
    from varlen.checkpoint import load_model
    from varlen.serve.engine import Engine
    from varlen.serve.request import SamplingParams

    model, _, tok = load_model(work.varlen_dir)
    serve = {**work.serve, **({"max_num_seqs": max_num_seqs} if max_num_seqs else {})}
    eng = Engine(model, tok, ServeConfig(**serve))

    def run(prompts, max_tokens, tag, clock=None):
        n = len(prompts)
        first, done, toks = [None] * n, [None] * n, [[] for _ in range(n)]
        steps, hits0 = 0, eng.blocks.num_cache_hits
        t0 = clock.start() if clock else time.perf_counter()
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            eng.add_request(p, SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True), f"{tag}{i}")
        while eng.has_unfinished():
            outs = eng.step()
            now = time.perf_counter()
            steps += 1
            for o in outs:
                i = int(o.request_id[len(tag):])
                if o.new_token_ids and first[i] is None:
                    first[i] = now
                toks[i] += o.new_token_ids
                if o.finished:
                    done[i] = now
        timing = clock.stop() if clock else {}
        return {**timing, "ttft": [f - t0 for f in first], "latency": [d - t0 for d in done], "outputs": toks,
                "engine_steps": steps, "prefix_cache_hit_blocks": eng.blocks.num_cache_hits - hits0}

    run(work.warmup_prompts, work.warmup_max_tokens, "w")
    res = run(work.prompts, work.max_tokens, "r", Clock())
    res["config"] = {"serve": serve, "torch_threads": torch.get_num_threads()}
    return res


def load_hf(work: Workload):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(work.hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    # EOS off: every request runs to its max_tokens, as varlen's ignore_eos (EOD is then an ordinary token).
    hf.generation_config.eos_token_id = None
    return hf


def run_hf_padded(work: Workload, args, batch: int = 16) -> dict:
    from transformers import StoppingCriteria, StoppingCriteriaList

    hf = load_hf(work)
    pad = work.eod_id

    class StepTimes(StoppingCriteria):
        """Called after every generated token: records when each decoding step finished, never stops."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def batch_inputs(prompts):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        return ids, mask

    def run(prompts, max_tokens, batch, clock=None):
        n = len(prompts)
        first, done, toks = [None] * n, [None] * n, [None] * n
        computed_out, computed_prompt, prompt_pad = 0, 0, 0
        t0 = clock.start() if clock else time.perf_counter()
        with torch.inference_mode():
            for s in range(0, n, batch):
                idx = list(range(s, min(s + batch, n)))
                ids, mask = batch_inputs([prompts[i] for i in idx])
                new = max(max_tokens[i] for i in idx)
                rec = StepTimes()
                out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=None,
                                  do_sample=False, pad_token_id=pad, stopping_criteria=StoppingCriteriaList([rec]))
                now = time.perf_counter()
                if out.shape[1] - ids.shape[1] != new or len(rec.times) != new:
                    raise RuntimeError(f"generate stopped early: {out.shape[1] - ids.shape[1]} of {new} tokens")
                for r, i in enumerate(idx):
                    toks[i] = out[r, ids.shape[1]:ids.shape[1] + max_tokens[i]].tolist()
                    first[i], done[i] = rec.times[0], now
                computed_out += len(idx) * new
                computed_prompt += ids.numel()
                prompt_pad += int((mask == 0).sum())
        timing = clock.stop() if clock else {}
        return {**timing, "ttft": [f - t0 for f in first], "latency": [d - t0 for d in done], "outputs": toks,
                "computed_output_tokens": computed_out, "computed_prompt_tokens": computed_prompt,
                "prompt_pad_tokens": prompt_pad, "batches": -(-n // batch)}

    run(work.warmup_prompts, work.warmup_max_tokens, batch)
    res = run(work.prompts, work.max_tokens, batch, Clock())
    res["config"] = {"batch": batch, "order": "arrival", "padding": "left", "attn": "sdpa",
                     "torch_threads": torch.get_num_threads()}
    return res


def run_hf_cb(work: Workload, args, sizes: str = "default") -> dict:
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    hf = load_hf(work)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max(work.max_tokens), eos_token_id=None,
                           pad_token_id=work.eod_id)
    cb_kwargs = {}
    if sizes == "matched":  # the same limits as varlen's engine
        per_block = 2 * hf.config.num_hidden_layers * hf.config.num_key_value_heads * \
            (hf.config.hidden_size // hf.config.num_attention_heads) * 4 * args.hf_cb_page_size
        cb_kwargs = {"max_batch_tokens": work.serve["max_num_batched_tokens"],
                     "max_requests_per_batch": work.serve["max_num_seqs"],
                     "num_blocks": max(1, int(work.serve["kv_cache_gib"] * 2 ** 30 // per_block))}
    cb = ContinuousBatchingConfig(page_size=args.hf_cb_page_size, **cb_kwargs)
    hints = WorkloadHints(max_prompt_length=max(len(p) for p in work.prompts),
                          max_generated_length=max(work.max_tokens), num_requests=work.n)
    manager = hf.init_continuous_batching(generation_config=gen, continuous_batching_config=cb,
                                          workload_hints=hints)
    manager.warmup()
    manager.start()

    def run(prompts, max_tokens, tag, clock=None):
        n = len(prompts)
        first, done, toks = [None] * n, [None] * n, [None] * n
        t0 = clock.start() if clock else time.perf_counter()
        for i, (p, m) in enumerate(zip(prompts, max_tokens)):
            manager.add_request(p, request_id=f"{tag}{i}", max_new_tokens=m, record_timestamps=True,
                                eos_token_id=-1)
        left = n
        while left:
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' continuous batching thread stopped")
                continue
            if not r.is_finished():
                continue
            now = time.perf_counter()
            if r.error is not None:
                raise RuntimeError(f"request {r.request_id} failed: {r.error}")
            i = int(r.request_id[len(tag):])
            toks[i], done[i], first[i] = list(r.generated_tokens), now, r.timestamps[0]
            left -= 1
        timing = clock.stop() if clock else {}
        return {**timing, "ttft": [f - t0 for f in first], "latency": [d - t0 for d in done], "outputs": toks}

    try:
        run(work.warmup_prompts, work.warmup_max_tokens, "w")
        res = run(work.prompts, work.max_tokens, "r", Clock())
        c = manager.continuous_batching_config
        res["config"] = {"sizes": sizes, "page_size": c.page_size, "num_blocks": c.num_blocks,
                         "max_batch_tokens": c.max_batch_tokens, "max_requests_per_batch": c.max_requests_per_batch,
                         "use_cuda_graph": list(c.use_cuda_graph), "use_async_batching": c.use_async_batching,
                         "attn_implementation": hf.config._attn_implementation,
                         "torch_threads": torch.get_num_threads(), "psutil": psutil.__version__}
    finally:
        manager.stop(block=True, timeout=10)
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_http(work: Workload, args, variant=None) -> dict:
    import httpx
    import openai

    port = free_port()
    s = work.serve
    cmd = [sys.executable, "-m", "varlen", "serve", work.varlen_dir, "--port", str(port), "--api-key", API_KEY,
           "--kv-cache-gib", str(s["kv_cache_gib"]), "--max-num-seqs", str(s["max_num_seqs"]),
           "--max-num-batched-tokens", str(s["max_num_batched_tokens"]), "--max-model-len", str(s["max_model_len"]),
           "--block-size", str(s["block_size"]), "--max-waiting", str(max(256, 2 * work.n)), "--name", "bench"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    log = open(Path(work.varlen_dir).parent / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with code {proc.returncode}; see {log.name}")
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server not healthy after 120 s")
            time.sleep(0.2)

        clients = [openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
                   for _ in range(args.clients)]

        def one(client, prompt, m):
            t_send = time.perf_counter()
            first, text, usage = None, [], None
            stream = client.completions.create(model="bench", prompt=prompt, max_tokens=m, temperature=0,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})
            for chunk in stream:
                if chunk.choices:
                    if first is None:
                        first = time.perf_counter()
                    text.append(chunk.choices[0].text or "")
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            return t_send, first, time.perf_counter(), "".join(text), usage

        def run(prompts, max_tokens, clock=None):
            n = len(prompts)
            todo: queue.SimpleQueue = queue.SimpleQueue()
            for i in range(n):
                todo.put(i)
            results: list = [None] * n
            errors: list = []

            def worker(client):
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        results[i] = one(client, prompts[i], max_tokens[i])
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(f"request {i}: {type(e).__name__}: {e}")

            threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
            t0 = clock.start() if clock else time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            timing = clock.stop() if clock else {}
            if errors:
                raise RuntimeError(f"{len(errors)} HTTP requests failed, first: {errors[0]}")
            return {**timing, "ttft": [r[1] - r[0] for r in results], "latency": [r[2] - r[0] for r in results],
                    "texts": [r[3] for r in results], "completion_tokens": [r[4] for r in results],
                    "arrival": [r[0] - t0 for r in results]}

        run(work.warmup_prompts, work.warmup_max_tokens)
        res = run(work.prompts, work.max_tokens, Clock(own_pids=[proc.pid]))
        res["config"] = {"clients": args.clients, "stream": True, "serve": s, "server_threads": args.threads}
        return res
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


RUNNERS = {"varlen": run_varlen, "hf_padded": run_hf_padded, "hf_cb": run_hf_cb, "http": run_http}


def run_method(key: str, work: Workload, args) -> dict:
    torch.set_num_threads(args.threads)
    rss0 = psutil.Process().memory_info().rss
    method, variant = split_key(key)
    res = RUNNERS[method](work, args, *([] if variant is None else [variant]))
    res["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res["rss_before_bytes"] = rss0
    return res


def _child(conn, key: str, work: Workload, args) -> None:
    try:
        conn.send(run_method(key, work, args))
    except BaseException as e:  # reported as this method's result; the others go on
        conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "traceback": traceback.format_exc()})
    conn.close()


def wait_for_idle(max_wait: float, threshold: float = 0.15, window: float = 3.0) -> dict:
    """On a shared machine: wait (up to max_wait s) until other processes use < threshold cores."""
    t0 = time.perf_counter()
    while True:
        b0 = cpu_busy_seconds()
        time.sleep(window)
        busy = (cpu_busy_seconds() - b0) / window
        waited = time.perf_counter() - t0
        if busy < threshold or waited >= max_wait:
            return {"waited_s": round(waited, 1), "busy_cores_before": round(busy, 2), "idle": busy < threshold}


def run_isolated(key: str, work: Workload, args) -> dict:
    """A fresh spawned process per method: nothing warmed or allocated by another method carries over."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, key, work, args))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = {"error": "worker died without a result (killed?)"}
    proc.join()
    if proc.exitcode:
        result.setdefault("error", f"worker exit code {proc.exitcode}")
    return result


# ------------------------------------------------------------------------------------------------ profile

def profile_varlen(work: Workload, args, out: Path) -> str:
    """varlen's engine on the same workload under cProfile (Python view) and torch.profiler (op view)."""
    import cProfile
    import io
    import pstats

    from varlen.checkpoint import load_model
    from varlen.serve.engine import Engine
    from varlen.serve.request import SamplingParams

    torch.set_num_threads(args.threads)
    model, _, tok = load_model(work.varlen_dir)
    n = min(work.n, args.profile_requests)

    def go():
        eng = Engine(model, tok, ServeConfig(**work.serve))
        for i in range(n):
            eng.add_request(work.prompts[i], SamplingParams(max_tokens=work.max_tokens[i], temperature=0.0,
                                                            ignore_eos=True), f"r{i}")
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
        return steps

    go()  # warm
    t0 = time.perf_counter()
    steps = go()
    plain = time.perf_counter() - t0
    prof = cProfile.Profile()
    prof.enable()
    go()
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
        go()
    ops = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=50)
    text = (f"varlen engine, first {n} requests of the workload ({sum(work.max_tokens[:n])} output tokens), "
            f"{steps} engine steps, {plain:.2f} s without profiler\n\n== cProfile, by own time ==\n{s.getvalue()}"
            f"\n== torch.profiler, CPU ops by self time ==\n{ops}\n")
    (out / "serve_throughput_profile.txt").write_text(text)
    return text


def _profile_child(conn, work, args, out):
    try:
        conn.send(profile_varlen(work, args, out))
    except BaseException:
        conn.send("profile failed:\n" + traceback.format_exc())
    conn.close()


# ------------------------------------------------------------------------------------------------ report

def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q))


def first_divergence(a: list[int], b: list[int]) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def compare(outs: list[list[int]], ref: list[list[int]], max_tokens: list[int]) -> dict:
    """Exact-match share of requests, and share of tokens generated before the first divergence."""
    same = [first_divergence(o, r) for o, r in zip(outs, ref)]
    exact = sum(s == m and len(o) == m for s, m, o in zip(same, max_tokens, outs))
    return {"exact_requests": exact, "requests": len(outs), "exact_share": exact / len(outs),
            "prefix_tokens_share": sum(same) / sum(max_tokens), "first_divergence": same}


@torch.inference_mode()
def divergence_margins(model, work: Workload, a: list[list[int]], b: list[list[int]]) -> list[dict]:
    """At each request's first divergence between a and b: varlen's logit gap between the two chosen tokens
    and between its top two tokens, given the shared prefix. A near-zero gap is a numerical tie, not a bug."""
    from varlen.batch import Batch
    rows = []
    for i, (x, y) in enumerate(zip(a, b)):
        k = first_divergence(x, y)
        if k >= work.max_tokens[i]:
            continue
        ids = work.prompts[i] + x[:k]
        logits = model(torch.tensor(ids), Batch.from_seqlens([len(ids)]))[-1].float()
        top2 = torch.topk(logits, 2).values
        rows.append({"request": i, "position": k, "tokens": [x[k], y[k]],
                     "gap_between_choices": float((logits[x[k]] - logits[y[k]]).abs()),
                     "top2_gap": float(top2[0] - top2[1])})
    return rows


def merge_repeats(results: list[dict]) -> dict:
    """The repeat with the median wall time stands for the method; every repeat's time is kept."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    ok_sorted = sorted(ok, key=lambda r: r["seconds"])
    median = dict(ok_sorted[(len(ok_sorted) - 1) // 2])
    median["repeat_seconds"] = [r["seconds"] for r in ok]
    median["repeat_other_cpu_cores"] = [r["other_cpu_cores"] for r in ok]
    median["repeats_failed"] = len(results) - len(ok)
    if "outputs" in median:  # greedy is deterministic: every repeat must give the same tokens
        median["repeats_same_outputs"] = all(r["outputs"] == median["outputs"] for r in ok)
    if "texts" in median:
        median["repeats_same_outputs"] = all(r["texts"] == median["texts"] for r in ok)
    return median


def reference_key(runs: dict[str, dict]) -> str | None:
    """The greedy reference: the first HF padded run that produced outputs."""
    return next((k for k, r in runs.items() if k.startswith("hf_padded") and "outputs" in r), None)


def summarize(work: Workload, runs: dict[str, dict], tok, args) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    ref_key = reference_key(runs)
    ref = runs[ref_key]["outputs"] if ref_key else None
    for key, r in runs.items():
        method, variant = split_key(key)
        row = {"method": method, "variant": variant, "label": label(key, args), "is_reference": key == ref_key}
        if "error" in r:
            rows[key] = {**row, "error": r["error"], "traceback": r.get("traceback")}
            continue
        row.update({k: v for k, v in r.items() if k not in ("outputs", "texts", "ttft", "latency", "arrival")})
        row["useful_tokens"] = work.useful_tokens
        row["tokens_per_s"] = work.useful_tokens / r["seconds"]
        row["tokens_per_s_repeats"] = [work.useful_tokens / t for t in r["repeat_seconds"]]
        row["latency_p50"], row["latency_p99"] = pct(r["latency"], 50), pct(r["latency"], 99)
        row["ttft_p50"], row["ttft_p99"] = pct(r["ttft"], 50), pct(r["ttft"], 99)
        if "outputs" in r:
            lens_ok = all(len(o) == m for o, m in zip(r["outputs"], work.max_tokens))
            row["every_request_got_max_tokens"] = lens_ok
            if ref is not None:
                row["match_vs_hf_padded"] = {"reference": ref_key, **compare(r["outputs"], ref, work.max_tokens)}
        if method == "http":
            row["every_request_got_max_tokens"] = r["completion_tokens"] == work.max_tokens
            if "varlen" in runs and "outputs" in runs["varlen"]:
                texts = [tok.decode(o) for o in runs["varlen"]["outputs"]]
                same = sum(a == b for a, b in zip(r["texts"], texts))
                row["text_match_vs_varlen_engine"] = {"exact_requests": same, "requests": work.n}
        row["per_request"] = {"ttft": r["ttft"], "latency": r["latency"]}
        rows[key] = row
    base = rows.get("varlen", {}).get("tokens_per_s")
    for row in rows.values():
        if base and "tokens_per_s" in row:
            row["varlen_speedup"] = base / row["tokens_per_s"]
    return rows


def fmt_match(row: dict) -> str:
    if row.get("is_reference"):
        return "(reference)"
    m = row.get("match_vs_hf_padded")
    if not m:
        t = row.get("text_match_vs_varlen_engine")
        return f"text = engine {t['exact_requests']}/{t['requests']}" if t else "-"
    return f"{m['exact_requests']}/{m['requests']} req, {100 * m['prefix_tokens_share']:.1f}% tok"


def table(rows: dict[str, dict]) -> list[list[str]]:
    out = []
    for method, r in rows.items():
        if "error" in r:
            out.append([r["label"], "FAILED: " + r["error"]] + [""] * 5)
            continue
        reps = r["tokens_per_s_repeats"]
        spread = f" ({min(reps):,.0f}-{max(reps):,.0f})" if len(reps) > 1 else ""
        out.append([r["label"], f"{r['tokens_per_s']:,.0f}{spread}", f"{r['varlen_speedup']:.2f}x",
                    f"{r['latency_p50']:.2f} / {r['latency_p99']:.2f}", f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}",
                    f"{r['seconds']:.1f}", fmt_match(r)])
    return out


HEAD = ["method", "output tok/s (range)", "varlen x", "latency p50 / p99 s", "TTFT p50 / p99 s", "wall s",
        "greedy = HF padded"]


def print_table(rows: dict[str, dict]) -> None:
    body = table(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEAD)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(HEAD, widths)))
    print(line)
    print("-" * len(line))
    for b in body:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))))


def markdown_table(rows: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(b) + " |" for b in table(rows)]
    return "\n".join(lines)


def evaluate_targets(rows: dict[str, dict]) -> list[dict]:
    """Against the fastest variant of each baseline (the strongest HF configuration measured)."""
    out = []
    for method, need in (("hf_padded", 3.0), ("hf_cb", 2.0)):
        runs = {k: r for k, r in rows.items() if r["method"] == method}
        timed = {k: r for k, r in runs.items() if "varlen_speedup" in r}
        name = f">= {need:.0f}x over {LABELS[method]}"
        if timed:
            k = min(timed, key=lambda k: timed[k]["varlen_speedup"])
            r = timed[k]
            out.append({"target": name + (f" (best: {r['label']})" if len(runs) > 1 else ""), "against": k,
                        "value": f"{r['varlen_speedup']:.2f}x", "pass": r["varlen_speedup"] >= need})
        elif runs:
            out.append({"target": name, "value": "not measured (failed)", "pass": False})
    return out


def plot(work: Workload, rows: dict[str, dict], path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = {m: r for m, r in rows.items() if "tokens_per_s" in r}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.1]})
    ys = list(range(len(ok)))[::-1]
    bars = ax1.barh(ys, [r["tokens_per_s"] for r in ok.values()], color=[f"C{i}" for i in range(len(ok))])
    for bar, (m, r) in zip(bars, ok.items()):
        note = f" {r['tokens_per_s']:,.0f}" + ("" if m == "varlen" else f"  (varlen {r['varlen_speedup']:.2f}x)")
        ax1.annotate(note, (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8)
    ax1.set_yticks(ys, [r["label"].replace(", ", ",\n", 1) for r in ok.values()], fontsize=8)
    ax1.set_xlabel("useful output tokens / s")
    ax1.set_title(f"{work.n} requests, {work.useful_tokens:,} output tokens, greedy")
    ax1.margins(x=0.35)
    for i, (m, r) in enumerate(ok.items()):
        lat = np.sort(r["per_request"]["latency"])
        ax2.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=r["label"], color=f"C{i}")
        ttft = np.sort(r["per_request"]["ttft"])
        ax2.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), color=f"C{i}", linestyle=":")
    ax2.set_xscale("log")
    ax2.set_xlabel("seconds (solid: request latency, dotted: time to first token)")
    ax2.set_ylabel("share of requests")
    ax2.set_title(f"CDF (offline: all arrive at t=0; http: {args.clients} in flight)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup-requests", type=int, default=4, help="short requests each method runs before timing")
    ap.add_argument("--seed", type=int, default=0, help="workload and weights")
    ap.add_argument("--prompt-median", type=float, default=96)
    ap.add_argument("--prompt-sigma", type=float, default=1.0)
    ap.add_argument("--prompt-min", type=int, default=8)
    ap.add_argument("--prompt-max", type=int, default=768)
    ap.add_argument("--max-tokens-median", type=float, default=48)
    ap.add_argument("--max-tokens-sigma", type=float, default=0.9)
    ap.add_argument("--max-tokens-min", type=int, default=4)
    ap.add_argument("--max-tokens-max", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--hf-batch", default="16,32",
                    help="requests per static HF generate batch; a comma list runs each (targets use the fastest)")
    ap.add_argument("--hf-cb-sizes", default="default",
                    help="transformers CB limits, comma list of: default (its own, from the workload hints and "
                         "RAM, as generate_batch sizes them) | matched (varlen's max tokens per batch, requests "
                         "per batch and KV cache budget); targets use the fastest")
    ap.add_argument("--hf-cb-page-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=16, help="concurrent openai clients for the HTTP run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs per method, round-robin, each in a fresh process; the median is reported")
    ap.add_argument("--wait-idle", type=float, default=300,
                    help="before each method, wait up to this many seconds for other processes to use < 0.15 "
                         "cores (a shared machine; 0 = don't wait)")
    ap.add_argument("--model", default=None, help="trained varlen run/checkpoint or HF Llama dir (default: random)")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=3)
    ap.add_argument("--n-kv-head", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, profile varlen's engine (cProfile + torch.profiler) on the workload's first "
                         "--profile-requests requests, written to --out/serve_throughput_profile.txt")
    ap.add_argument("--profile-requests", type=int, default=64)
    ap.add_argument("--cache-dir", default=None, help="token store cache (default $VARLEN_CACHE)")
    ap.add_argument("--work-dir", default=None, help="where the model directories go (default: a temp dir)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON, PNG and markdown")
    ap.add_argument("--name", default="serve_throughput", help="file stem of the outputs")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if not set(methods) <= set(METHODS) or not methods:
        raise SystemExit(f"--methods must be drawn from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="serve_bench_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    for d in ("varlen_model", "hf_model"):
        shutil.rmtree(work_dir / d, ignore_errors=True)
    torch.set_num_threads(args.threads)

    info = machine_info(args.threads, ("transformers", "openai", "psutil"))
    model, cfg, tok, store, varlen_dir, hf_dir, source = make_weights(args, work_dir)
    max_len = min(args.max_model_len, cfg.model.max_seq_len)
    work = build_workload(store, args, varlen_dir, hf_dir, tok.eod_id, max_len)
    m = cfg.model
    plen = np.array([len(p) for p in work.prompts])
    mt = np.array(work.max_tokens)
    print(f"date {info['date']} | CPU {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB) | "
          f"matrix units: {matrix_units(info)} | "
          f"torch {info['torch']}, transformers {info['transformers']}, openai {info['openai']}, psutil "
          f"{info['psutil']}, python {info['python']} | {args.threads} torch threads | load avg "
          f"{os.getloadavg()[0]:.2f}")
    print(f"command: {' '.join([Path(sys.executable).name] + sys.argv)}")
    print(f"model: {source}; dim {m.dim}, {m.n_layer} layers, {m.n_head} heads ({m.n_kv_head} kv), ffn {m.ffn_dim}, "
          f"vocab {m.vocab_size}, {model.num_params() / 1e6:.2f}M parameters, fp32, max_model_len {max_len}")
    print(f"workload (seed {args.seed}): {work.n} requests, prompts = starts of stdlib documents; prompt tokens "
          f"lognormal(median {args.prompt_median:g}, sigma {args.prompt_sigma:g}) clipped [{args.prompt_min}, "
          f"{args.prompt_max}]: p50 {np.median(plen):.0f}, p90 {np.percentile(plen, 90):.0f}, max {plen.max()}, "
          f"total {plen.sum():,}; max_tokens lognormal(median {args.max_tokens_median:g}, sigma "
          f"{args.max_tokens_sigma:g}) clipped [{args.max_tokens_min}, {args.max_tokens_max}]: p50 {np.median(mt):.0f}, "
          f"p90 {np.percentile(mt, 90):.0f}, max {mt.max()}, total {mt.sum():,} useful output tokens")
    print(f"greedy (temperature 0), EOS ignored by every method (ignore_eos / eos_token_id=None / -1): every request "
          f"yields exactly its max_tokens. varlen engine and server: max_num_seqs {args.max_num_seqs}, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}, kv_cache_gib {args.kv_cache_gib}, block "
          f"{args.block_size}; HF padded: batches of {args.hf_batch} in arrival order; HF CB sizes: {args.hf_cb_sizes}; "
          f"HTTP: {args.clients} concurrent streaming openai clients")
    print(f"timing: each method in a fresh process, warmed up on {args.warmup_requests} short requests, then the "
          f"clock runs from the first submission to the last result; offline methods submit everything at t=0",
          flush=True)

    # Repeats go round-robin (every method once, then again), each in a fresh process, so a drift in the
    # machine's speed hits every method alike; a method's figures come from its median-throughput repeat.
    keys = run_keys(methods, args)
    reps: dict[str, list[dict]] = {k: [] for k in keys}
    for rep in range(args.repeats):
        for key in keys:
            idle = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
            t0 = time.perf_counter()
            r = run_isolated(key, work, args)
            reps[key].append(r)
            if idle:
                r["wait_for_idle"] = idle
                if not idle["idle"]:
                    print(f"  (machine still busy after waiting {idle['waited_s']}s: {idle['busy_cores_before']} cores)")
            status = f"FAILED {r['error']}" if "error" in r else f"{r['seconds']:.1f}s timed"
            print(f"  [{rep + 1}/{args.repeats}] {key}: {status}, {time.perf_counter() - t0:.0f}s in all (load avg "
                  f"before timing {r.get('load_avg_1min_before', float('nan')):.2f}, other processes "
                  f"{r.get('other_cpu_cores', float('nan')):.2f} cores)", flush=True)
            if "error" in r:
                print(r.get("traceback", ""), flush=True)
    runs = {k: merge_repeats(v) for k, v in reps.items()}

    rows = summarize(work, runs, tok, args)
    print(f"\n=== {work.n} requests, {work.useful_tokens:,} useful output tokens ===")
    print_table(rows)
    columns = (f"columns: output tok/s = useful output tokens (sum of max_tokens) / wall time, median of {args.repeats} "
               f"repeats (range over repeats); varlen x = varlen engine's median tok/s over that method's; latency, "
               f"TTFT and wall s from the median repeat, counted from t=0 (http: from each request's send); greedy = "
               f"HF padded: requests whose tokens equal HF padded generate's exactly, and the share of tokens before "
               f"the first divergence (http: decoded text equal to the varlen engine's)")
    print(columns)
    notes = []
    for key, p in rows.items():
        if "computed_output_tokens" in p:
            notes.append(f"{p['label']}: computed {p['computed_output_tokens']:,} output positions for "
                         f"{work.useful_tokens:,} useful ({100 * work.useful_tokens / p['computed_output_tokens']:.1f}%), "
                         f"and {p['computed_prompt_tokens']:,} prompt positions of which {p['prompt_pad_tokens']:,} "
                         f"padding")
        if p.get("method") == "hf_cb" and "config" in p:
            notes.append(f"{p['label']}, config as resolved by transformers: {p['config']}")
    for key, r in rows.items():
        if "engine_steps" in r:
            notes.append(f"{r['label']}: {r['engine_steps']} engine steps, {work.useful_tokens / r['engine_steps']:.1f} "
                         f"output tokens per step; {r['prefix_cache_hit_blocks']} prompt blocks "
                         f"({r['prefix_cache_hit_blocks'] * args.block_size} tokens) reused from the prefix cache")
    busy = [k for k, r in rows.items() if max(r.get("repeat_other_cpu_cores", [0])) > 0.2]
    if busy:
        notes.append(f"WARNING: other processes used > 0.2 cores while timing {', '.join(busy)}: those rates are low")
    for k, r in rows.items():
        if r.get("every_request_got_max_tokens") is False:
            notes.append(f"WARNING: {k}: some request did not return exactly its max_tokens tokens")
        if r.get("repeats_same_outputs") is False:
            notes.append(f"WARNING: {k}: greedy outputs differ between repeats")
        if "other_cpu_cores" in r:
            notes.append(f"{k}: CPU while timing (median repeat): own processes {r['own_cpu_cores']:.2f} cores, "
                         f"others {r['other_cpu_cores']:.2f} cores (max over repeats "
                         f"{max(r['repeat_other_cpu_cores']):.2f}), load avg before {r['load_avg_1min_before']:.2f}; "
                         f"peak RSS {r['peak_rss_bytes'] / 2 ** 30:.2f} GiB; repeats "
                         f"{', '.join(f'{t:.1f}' for t in r['repeat_seconds'])} s")

    margins = []
    ref_key = reference_key(runs)
    if ref_key:
        notes.append(f"greedy reference: {label(ref_key, args)}")
    if "outputs" in runs.get("varlen", {}) and ref_key:
        margins = divergence_margins(model, work, runs["varlen"]["outputs"], runs[ref_key]["outputs"])
        if margins:
            gaps = np.array([g["gap_between_choices"] for g in margins])
            top2 = np.array([g["top2_gap"] for g in margins])
            notes.append(f"varlen vs HF padded diverge in {len(margins)} of {work.n} requests; at the first divergence "
                         f"varlen's logits of the two tokens chosen differ by median {np.median(gaps):.2e}, max "
                         f"{gaps.max():.2e} (its top-2 gap there: median {np.median(top2):.2e}); a gap near float32 "
                         f"rounding is a numerical tie, not a different computation")
    if "varlen" in rows:
        rows["varlen"]["divergences_vs_hf_padded"] = margins
    for line in notes:
        print(line)

    print("\ntargets:")
    verdicts = evaluate_targets(rows)
    for t in verdicts:
        print(f"  {t['target']:100} {t['value']:>8}  {'PASS' if t['pass'] else 'FAIL'}")

    profile_text = None
    if args.profile and "varlen" in methods:
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        ctx = mp.get_context("spawn")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_profile_child, args=(send, work, args, out))
        proc.start()
        send.close()
        profile_text = recv.recv()
        proc.join()
        print(f"\nprofile of varlen's engine written to {out / 'serve_throughput_profile.txt'}")

    workload_desc = {"requests": work.n, "useful_output_tokens": work.useful_tokens,
                     "prompt_tokens": [len(p) for p in work.prompts], "max_tokens": work.max_tokens,
                     "docs": work.docs}
    report = {"machine": info, "command": [Path(sys.executable).name] + sys.argv, "args": vars(args),
              "model": {**asdict(m), "source": source, "params": model.num_params()}, "workload": workload_desc,
              "targets": verdicts, "methods": rows}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(work, rows, out / f"{args.name}.png", args)
    md = [f"## Serving throughput: varlen engine vs HF `generate` and transformers continuous batching",
          "", f"Run {info['date']} on {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB), "
          f"torch {info['torch']}, transformers {info['transformers']}, openai {info['openai']}, python "
          f"{info['python']}, {args.threads} torch threads.", "", "```bash",
          " ".join([".venv/bin/python"] + sys.argv), "```", "",
          f"Model: {source}; dim {m.dim}, {m.n_layer} layers, {m.n_head}/{m.n_kv_head} heads, vocab {m.vocab_size}, "
          f"{model.num_params() / 1e6:.2f} M parameters, fp32. Workload: {work.n} requests, prompt tokens p50 "
          f"{np.median(plen):.0f} / p90 {np.percentile(plen, 90):.0f} / max {plen.max()}, max_tokens p50 "
          f"{np.median(mt):.0f} / p90 {np.percentile(mt, 90):.0f} / max {mt.max()}, {work.useful_tokens:,} useful "
          f"output tokens; greedy, EOS ignored.", "", markdown_table(rows), "", columns[0].upper() + columns[1:] + ".",
          ""] + [f"- {n}" for n in notes] + [
          "", "Targets:", "",
          "| target | measured | |", "|---|---|---|"]
    md += [f"| {t['target']} | {t['value']} | {'met' if t['pass'] else '**missed**'} |" for t in verdicts]
    md += ["", f"Plot: `{out / (args.name + '.png')}`; raw numbers: `{out / (args.name + '.json')}`."]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"\nwrote {out / (args.name + '.json')}, {out / (args.name + '.png')} and {out / (args.name + '.md')}")
    if profile_text:
        print("\n" + profile_text[:6000])


if __name__ == "__main__":
    main()
