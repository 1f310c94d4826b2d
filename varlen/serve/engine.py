"""The serving loop: requests in, one packed forward per step, tokens and text out.

Engine is the streaming interface (add_request / step / abort); LLM wraps it for offline batches:
`LLM(path).generate(prompts, SamplingParams(...))`. With ServeConfig.speculative a step may emit several
tokens per request (serve/speculate.py); its outputs are what ordinary decoding would give.
"""
from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..config import ModelConfig, ServeConfig
from ..data.tokenizer import TextTokenizer
from ..model.quant import int8_rows
from ..model.transformer import Transformer
from ..precision import prepare_model
from . import compiled
from .block_manager import BlockManager
from .request import Request, RequestError, SamplingParams
from .runner import ModelRunner, SeqLogits, num_blocks_for
from .sampler import SamplingFailed, logprob_entry, process, sample
from .scheduler import Scheduler
from .speculate import SpecStats, accept, confidences, draft, draft_length, num_drafts_per_step

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """What one step produced for one request; text is the newly safe-to-show text only."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict]
    finished: bool
    finish_reason: str | None          # "stop" | "length" | "error" (then `error` says why)
    error: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0         # prompt tokens whose K/V came from the prefix cache


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict] = field(default_factory=list)
    error: str | None = None           # why, when finish_reason is "error"


def warmup_prompts(int8_max_rows: int | None, max_num_seqs: int, num_speculative: int = 0,
                   ) -> list[list[list[int]]]:
    """Batches of prompts whose prefill and decode steps (2 tokens each) meet every graph a compiled forward
    has. The general graph: one token, one sequence of several, several sequences. The decode graph: one
    sequence or several, per count of new tokens per sequence (1, and with drafts up to 1 + drafts: a prompt
    that short prefills in the graph its verify steps run). With int8 weights, each on both sides of the row
    count c up to which the int8 kernel runs (the model branches on it)."""
    k, c = num_speculative, int8_max_rows
    q = k + 2  # the shortest prompt the general graph prefills alone
    lengths = [[q + 3], [q + 4, q + 5]]
    for n in range(2, k + 2):
        lengths += [[n], [n, n]]
    if c:
        lengths += [[max(c + 1, q)]]                      # general: one sequence past c
        if q <= c:
            lengths += [[q]]                              # ... and within c
        if c >= 2:
            lengths += [[max(c, q), 1]]                   # several sequences, tokens past c, rows within
        if c >= 3:
            lengths += [[1, 2]]                           # several within c
        if c < max_num_seqs:
            lengths += [[q] * (c + 1)]                    # rows past c; its decode step: c + 1 sequences
        for n in range(2, k + 2):
            b = c // n + 1                                # decode graph of n tokens a sequence, past c
            if 2 <= b <= max_num_seqs:
                lengths += [[n] * b]
    # Every prompt its own token: none may find another's blocks in the prefix cache and prefill less.
    token = iter(range(1, 10 ** 6))
    return [[[next(token)] * n for n in batch] for batch in lengths]


class Engine:
    def __init__(self, model: Transformer, tokenizer: TextTokenizer, cfg: ServeConfig | None = None):
        self.cfg = cfg = cfg or ServeConfig()
        # The engine owns the model from here: cast in place (a copy would double the weights' memory), so
        # the KV cache below, sized and typed from the parameters, follows. Logits stay float32 (runner.run).
        model.fuse_projections_()  # one matmul for q/k/v and one for gate/up: fewer calls per step
        self.num_speculative = num_drafts_per_step(cfg, model.cfg.mtp_heads)  # 0 = ordinary decoding
        no_compile = compiled.why_not(cfg) if cfg.compile else "not asked for"
        if cfg.compile and no_compile:
            log.warning("--compile ignored: %s; serving eagerly", no_compile)
        # A compiled forward gets plain weights: inductor freezes and prepacks them itself.
        self.precision = prepare_model(model, cfg.dtype, cfg.quantization, pack=bool(no_compile))
        self.model, self.tokenizer = model.eval(), tokenizer
        mcfg: ModelConfig = model.cfg
        self.max_model_len = cfg.max_model_len or mcfg.max_seq_len
        dtype = next(model.parameters()).dtype
        per_seq = -(-self.max_model_len // cfg.block_size)
        # More blocks than every running sequence at full length could use only feeds the prefix cache.
        num_blocks = min(num_blocks_for(cfg.kv_cache_gib * 2 ** 30, mcfg, cfg.block_size, dtype,
                                        self.num_speculative),
                         2 * cfg.max_num_seqs * per_seq)
        if num_blocks < per_seq:
            raise RequestError(f"kv_cache_gib {cfg.kv_cache_gib} holds {num_blocks} blocks of {cfg.block_size} "
                               f"tokens, fewer than one {self.max_model_len}-token sequence needs ({per_seq}); "
                               f"raise kv_cache_gib or lower max_model_len")
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, cfg.block_size, heads=self.num_speculative,
                                  step_fn=None if no_compile else compiled.CompiledStep(model, cfg.autotune))
        self.spec_stats = SpecStats(self.num_speculative)
        self.requests: dict[str, Request] = {}
        self._emitted: dict[str, int] = {}
        self._ids = itertools.count()
        self._guides = None  # structured.GuideFactory, built at the first request with a grammar (~1 s)
        if self.runner.step_fn is not None:
            self._compile_now()
        # Relative cost of a step of 1 + d new tokens, for adaptive drafting (_draft); flat = keep every draft.
        self.verify_costs = [1.0] * (self.num_speculative + 1)
        if self.num_speculative and cfg.adaptive_drafts:
            self.verify_costs = self._measure_verify_costs()

    def _compile_now(self) -> None:
        """Compile every graph serving needs before the first request rather than during it (see
        warmup_prompts and compiled.CompiledStep). If the compiler fails, serve eagerly with prepacked weights."""
        log.info("compiling the forward with torch.compile (minutes on a small CPU)")
        t0 = time.perf_counter()
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        try:
            for prompts in warmup_prompts(int8_rows(self.model), self.cfg.max_num_seqs, self.num_speculative):
                self.generate(prompts, params)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path still serves
            log.warning("torch.compile failed (%s: %s); serving eagerly", type(e).__name__, str(e)[:300])
            self.runner.step_fn = None
            from ..model.packed import pack_linears_, packs
            if packs(next(self.model.parameters())):  # what prepare_model left plain for the compiler
                pack_linears_(self.model)
            for req_id in list(self.requests):
                self.abort(req_id)
            return
        log.info("compiled in %.0f s", time.perf_counter() - t0)

    def _measure_verify_costs(self, repeats: int = 5) -> list[float]:
        """Time one sequence's forward of q = 1 .. 1 + drafts new tokens (a q-token prompt: the graph and
        kernels a verify step of q - 1 drafts runs) -> each relative to q = 1, the fastest of `repeats`, made
        non-decreasing (a step with more tokens never costs less; a faster reading is noise)."""
        token = iter(range(1, 10 ** 6))
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        best = []
        for q in range(1, self.num_speculative + 2):
            times = []
            for _ in range(repeats):
                prompt = [next(token) % self.model.cfg.vocab_size] * q  # its own tokens: no prefix-cache hit
                t0 = time.perf_counter()
                self.generate([prompt], params)
                times.append(time.perf_counter() - t0)
            best.append(min(times))
        costs = [max(best[:i + 1]) / best[0] for i in range(len(best))]
        log.info("speculative: a step of 1 + d new tokens costs %s x one of 1 (d = 0 ..); drafts are cut to "
                 "what the heads' confidence says pays", " / ".join(f"{c:.2f}" for c in costs))
        return costs

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty; send at least one character")
            ids = self.tokenizer.encode_prompt(prompt)
            if not ids:  # a tokenizer without a BOS whose normalizer dropped every character
                raise RequestError("prompt encodes to no tokens; send text the tokenizer keeps")
            return ids
        if not prompt:
            raise RequestError("prompt is empty; send at least one token")
        vocab = self.model.cfg.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue one sequence (n is handled by the caller, one request per completion); returns its id."""
        params.validate(self.cfg.max_n, self.cfg.max_stop, self.cfg.max_logprobs)
        vocab = self.model.cfg.vocab_size
        for name, tokens in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in tokens if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{name} names token {bad[0]}, outside the vocabulary [0, {vocab})")
        ids = self.encode_prompt(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        if len(self.scheduler.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are already waiting; retry shortly")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.Generator().seed())
        req = Request(request_id, ids, params, generator=gen, guide=self._guide(params.grammar))
        self.requests[request_id] = req
        self._emitted[request_id] = 0
        self.scheduler.add(req)
        return request_id

    def _guide(self, grammar: str | None):
        if grammar is None:
            return None
        from .structured import GrammarError, GuideFactory
        if self._guides is None:
            self._guides = GuideFactory(self.tokenizer, self.model.cfg.vocab_size)
        try:
            return self._guides.new(grammar)
        except GrammarError as e:
            raise RequestError(f"response_format: {e}") from None

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks are free when this returns."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, "abort")
        self._emitted.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # ------------------------------------------------------------------ one step
    def step(self) -> list[StepOutput]:
        plan = self.scheduler.schedule()
        if not plan.scheduled:
            return []
        results = self.runner.run(plan.scheduled)
        outputs, drafting = [], []
        max_batch = self.cfg.speculative_max_batch
        # A request left without drafts verifies nothing next step: an ordinary decode.
        may_draft = self.num_speculative and (not max_batch or len(self.scheduler.running) <= max_batch)
        for (req, n), logits in zip(plan.scheduled, results):
            end = req.num_computed + n
            if end < req.num_tokens:
                self.scheduler.commit(req, end)  # a prefill chunk; its last token's logits come later
                continue
            drafts = req.draft_ids[:end - req.num_tokens]  # the scheduler may have run fewer than drafted
            try:  # a request whose sampling fails ends alone; the rest of the step goes on
                tokens = self._sample(req, logits, drafts)
                # The K/V of rejected drafts stay in their slots until overwritten; only the accepted count.
                outputs.append(self._append(req, tokens, logits, end - (len(drafts) - (len(tokens) - 1))))
            except Exception as e:  # noqa: BLE001 (bad input or a failed draw: this request only)
                outputs.append(self._fail(req, e))
                continue
            req.draft_ids, req.draft_probs = [], None  # until this step's heads propose the next ones
            if may_draft and not req.is_finished and not req.params.has_processors:
                # The heads at the row that produced the last token propose the tokens after it.
                drafting.append((req, logits.draft_states[len(tokens) - 1]))
        if drafting:
            head_logits = self.runner.draft_logits(torch.stack([states for _, states in drafting]))  # (n, k, vocab)
            for (req, _), rows in zip(drafting, head_logits):
                self._draft(req, rows)
        return outputs

    def _sample(self, req: Request, logits: SeqLogits, drafts: list[int]) -> list[int]:
        """The tokens the request emits this step: one sampled token, or verified drafts plus one."""
        if not torch.isfinite(logits.base).all():
            raise SamplingFailed("the model produced non-finite logits for this request")
        if not drafts:
            return [sample(process(logits.base[0], req, self.tokenizer.eod_id), req.params, req.generator)]
        q = None if req.draft_probs is None else req.draft_probs[:len(drafts)]
        tokens = accept(logits.base, drafts, q, req.params, req.generator)
        self.spec_stats.record(len(drafts), len(tokens) - 1)
        return tokens

    def _fail(self, req: Request, error: Exception) -> StepOutput:
        """End one request with an error; its blocks are free at once."""
        if not req.is_finished:
            self.scheduler.finish(req, "error")
        self.requests.pop(req.request_id, None)
        self._emitted.pop(req.request_id, None)
        return StepOutput(req.request_id, [], "", [], True, "error", error=str(error) or type(error).__name__,
                          num_prompt_tokens=len(req.prompt_ids), num_cached_tokens=req.num_cached)

    def _append(self, req: Request, tokens: list[int], logits: SeqLogits, num_computed: int) -> StepOutput:
        """Emit the step's tokens in order until one ends the request (eod, a stop string, max_tokens): the
        tokens after it are dropped, as ordinary decoding would never have produced them."""
        p = req.params
        new_ids, new_lp, reason = [], [], None
        for row, token in enumerate(tokens):
            if token == self.tokenizer.eod_id and not p.ignore_eos or token in p.stop_token_ids:
                reason = "stop"
                break
            req.output_ids.append(token)
            new_ids.append(token)
            if req.guide is not None:
                req.guide.advance(token)
                if req.guide.is_finished:  # the grammar is complete: only end-of-text could follow
                    reason = "stop"
            if p.logprobs is not None:
                entry = logprob_entry(logits.base[row], token, p.logprobs)
                req.logprobs.append(entry)
                new_lp.append(entry)
            if req.detok is None:
                req.detok = self.tokenizer.decode_stream()
            text = req.output_text + req.detok.step(token)
            cut = _find_stop(text, p.stop, len(req.output_text))
            if cut is not None:
                text, reason = text[:cut], "stop"
            req.output_text = text
            if reason is None and (len(req.output_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len):
                reason = "length"
            if reason is not None:
                break
        # Accepted drafts after a stop were computed but are not the request's tokens any more.
        self.scheduler.commit(req, min(num_computed, req.num_tokens))
        if reason is not None:
            self.scheduler.finish(req, reason)
        new_text = self._new_text(req, final=reason is not None)
        if reason is not None:
            self.requests.pop(req.request_id, None)
            self._emitted.pop(req.request_id, None)
        return StepOutput(req.request_id, new_ids, new_text, new_lp, reason is not None, reason,
                          num_prompt_tokens=len(req.prompt_ids), num_cached_tokens=req.num_cached)

    def _draft(self, req: Request, head_rows: torch.Tensor) -> None:
        """Set the request's drafts from its heads' logits (num_speculative, vocab) at its last token: no more
        than max_tokens and the context leave room for after the token the verify step is sure to add (step()
        has already cleared the last drafts)."""
        limit = min(self.num_speculative, req.params.max_tokens - len(req.output_ids) - 1,
                    self.max_model_len - req.num_tokens - 1)
        if limit <= 0:
            return
        ids, q = draft(head_rows[:limit], req.params, req.generator)
        # A seeded request drafts all it may: its tokens must not depend on costs timed at this start-up.
        if self.cfg.adaptive_drafts and req.params.seed is None:
            d = draft_length(confidences(head_rows[:limit], q), self.verify_costs)
            ids, q = ids[:d], None if q is None else q[:d]
        req.draft_ids, req.draft_probs = ids, q

    def _new_text(self, req: Request, final: bool) -> str:
        """Text not yet streamed, holding back a possible stop-string start (the decode stream already holds
        back a character whose bytes have not all arrived)."""
        text, start = req.output_text, self._emitted[req.request_id]
        end = len(text)
        if not final:
            for s in req.params.stop:
                for k in range(min(len(s) - 1, end - start), 0, -1):
                    if text[end - k:end] == s[:k]:
                        end -= k
                        break
        self._emitted[req.request_id] = max(start, end)
        return text[start:end]

    # ------------------------------------------------------------------ offline batches
    def generate(self, prompts: list[str | list[int]], params: SamplingParams,
                 progress: bool = False) -> list[list[Completion]]:
        """All prompts; returns params.n completions per prompt, in prompt order (any number: see generate_iter)."""
        return [c for _, c in self.generate_iter(prompts, params, progress, total=len(prompts))]

    def generate_iter(self, prompts: Iterable[str | list[int]], params: SamplingParams, progress: bool = False,
                      total: int | None = None) -> Iterator[tuple[int, list[Completion]]]:
        """Yield (index, params.n completions) per prompt, in input order, once it and every earlier prompt are
        done. Prompts are pulled lazily and at most offline_window(cfg, n) requests are alive at once (queued,
        running, or done and waiting for an earlier prompt), so any number of prompts runs in bounded memory
        and the waiting queue never fills. A prompt add_request refuses raises PromptError with its 0-based
        index. However the generator stops (an error, or the caller closing it), requests still in flight are
        aborted, so the engine is left idle. Expects an idle engine: other requests' outputs would be lost."""
        # Checked once here, so a bad parameter is not reported as a fault of prompt 0.
        params.validate(self.cfg.max_n, self.cfg.max_stop, self.cfg.max_logprobs)
        n, window, source = params.n, offline_window(self.cfg, params.n), iter(prompts)
        admitted = done = 0                              # prompts pulled from `source`; prompts yielded
        exhausted = False
        pending: deque[tuple[int, int, str | list[int]]] = deque()  # (index, j, prompt) not yet queued
        owner: dict[str, tuple[int, int]] = {}           # our request ids in the engine -> (index, j)
        partial: dict[str, Completion] = {}              # their output so far
        groups: dict[int, list[Completion | None]] = {}  # admitted and not yet yielded: at most window / n
        bar = _progress_bar(total) if progress else None
        try:
            while True:
                # A whole prompt (its n requests) at a time, so a prompt never waits on its own admission.
                while not exhausted and (admitted - done + 1) * n <= window:
                    prompt = next(source, _END)
                    if prompt is _END:
                        exhausted = True
                        break
                    groups[admitted] = [None] * n
                    pending.extend((admitted, j, prompt) for j in range(n))
                    admitted += 1
                # The queue limit is separate from the window: n requests may not fit in max_waiting at once.
                while pending and len(self.scheduler.waiting) < self.cfg.max_waiting:
                    i, j, prompt = pending.popleft()
                    rid = f"gen-{i}-{j}"
                    try:
                        self.add_request(prompt, _nth(params, j), rid)
                    except RequestError as e:
                        raise PromptError(i, str(e)) from None
                    owner[rid], partial[rid] = (i, j), Completion("", [], "")
                if not owner and not pending:  # every admitted prompt was yielded and the source is empty
                    return
                for out in self.step():
                    c = partial.get(out.request_id)
                    if c is None:
                        continue  # not one of ours
                    c.token_ids += out.new_token_ids
                    c.text += out.new_text
                    c.logprobs += out.new_logprobs
                    if out.finished:
                        c.finish_reason, c.error = out.finish_reason, out.error
                        i, j = owner.pop(out.request_id)
                        groups[i][j] = partial.pop(out.request_id)
                while done < admitted and all(c is not None for c in groups[done]):
                    yield done, groups.pop(done)
                    done += 1
                    if bar is not None:
                        bar.update(1)
        finally:
            for rid in owner:
                self.abort(rid)
            if bar is not None:
                bar.close()


def offline_window(cfg: ServeConfig, n: int = 1) -> int:
    """Requests an offline batch keeps alive at once: two full batches, so the running batch stays full while
    up to one batch of finished prompts waits for an earlier, longer one; never fewer than one prompt's n."""
    return max(n, 2 * cfg.max_num_seqs)


def _progress_bar(total: int | None):
    from tqdm import tqdm  # only when asked for: the engine itself does not need it
    return tqdm(total=total, desc="prompts", unit="prompt")


_END = object()  # next(source, _END): the end of the prompts, unlike any prompt


class PromptError(RequestError):
    """add_request refused prompt `index` (0-based) of an offline batch; `reason` says why."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"prompt {index} (counting from 0): {reason}")
        self.index, self.reason = index, reason


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (HTTP 429)."""


def _nth(params: SamplingParams, j: int) -> SamplingParams:
    """The j-th of n completions: its own seed (seed + j), so the n samples differ but stay reproducible."""
    from dataclasses import replace
    seed = None if params.seed is None else params.seed + j
    return replace(params, n=1, seed=seed)


def _find_stop(text: str, stops: list[str], searched: int) -> int | None:
    """Index of the first stop string in text (only the part after `searched` can hold a new match)."""
    best = None
    for s in stops:
        i = text.find(s, max(0, searched - len(s) + 1))
        if i >= 0 and (best is None or i < best):
            best = i
    return best


class LLM(Engine):
    """Offline generation from a varlen run/checkpoint or a Hugging Face Llama directory."""

    def __init__(self, path: str | Path, cfg: ServeConfig | None = None, device: str | torch.device = "cpu"):
        model, _, tokenizer = load_model(path, device)
        super().__init__(model, tokenizer, cfg)
