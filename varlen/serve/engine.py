"""The serving loop: requests in, one packed forward per step, tokens and text out.

Engine is the streaming interface (add_request / step / abort); LLM wraps it for offline batches:
`LLM(path).generate(prompts, SamplingParams(...))`. With ServeConfig.speculative a step may emit several
tokens per request (serve/speculate.py); its outputs are what ordinary decoding would give.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import load_model
from ..config import ModelConfig, ServeConfig
from ..data.tokenizer import TextTokenizer
from ..model.transformer import Transformer
from .block_manager import BlockManager
from .request import Request, RequestError, SamplingParams, Status
from .runner import ModelRunner, SeqLogits, num_blocks_for
from .sampler import logprob_entry
from .scheduler import Scheduler
from .speculate import SpecStats, accept, draft, num_drafts_per_step


@dataclass
class StepOutput:
    """What one step produced for one request; text is the newly safe-to-show text only."""
    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[dict]
    finished: bool
    finish_reason: str | None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict] = field(default_factory=list)


class Engine:
    def __init__(self, model: Transformer, tokenizer: TextTokenizer, cfg: ServeConfig | None = None):
        self.cfg = cfg = cfg or ServeConfig()
        self.model, self.tokenizer = model.eval(), tokenizer
        mcfg: ModelConfig = model.cfg
        self.max_model_len = cfg.max_model_len or mcfg.max_seq_len
        self.num_speculative = num_drafts_per_step(cfg, mcfg.mtp_heads)  # 0 = ordinary decoding
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
        self.runner = ModelRunner(model, num_blocks, cfg.block_size, heads=self.num_speculative)
        self.spec_stats = SpecStats(self.num_speculative)
        self.requests: dict[str, Request] = {}
        self._emitted: dict[str, int] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ requests
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt is empty; send at least one character")
            return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)  # as training documents start
        if not prompt:
            raise RequestError("prompt is empty; send at least one token")
        vocab = self.model.cfg.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})")
        return list(prompt)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue one sequence (n is handled by the caller, one request per completion); returns its id."""
        params.validate(self.cfg.max_n, self.cfg.max_stop, self.cfg.max_logprobs)
        ids = self.encode_prompt(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                               f"context of {self.max_model_len} tokens; shorten the prompt or lower max_tokens")
        if len(self.scheduler.waiting) >= self.cfg.max_waiting:
            raise QueueFull(f"{len(self.scheduler.waiting)} requests are already waiting; retry shortly")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        req = Request(request_id, ids, params, generator=gen)
        self.requests[request_id] = req
        self._emitted[request_id] = 0
        self.scheduler.add(req)
        return request_id

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
            q = None if req.draft_probs is None else req.draft_probs[:len(drafts)]
            tokens = accept(logits.base, drafts, q, req.params, req.generator)
            self.spec_stats.record(len(drafts), len(tokens) - 1)
            # The K/V of rejected drafts stay in their slots until overwritten; only the accepted count.
            outputs.append(self._append(req, tokens, logits, end - (len(drafts) - (len(tokens) - 1))))
            req.draft_ids, req.draft_probs = [], None  # until this step's heads propose the next ones
            if may_draft and not req.is_finished:
                # The heads at the row that produced the last token propose the tokens after it.
                drafting.append((req, logits.draft_states[len(tokens) - 1]))
        if drafting:
            head_logits = self.runner.draft_logits(torch.stack([states for _, states in drafting]))  # (n, k, vocab)
            for (req, _), rows in zip(drafting, head_logits):
                self._draft(req, rows)
        return outputs

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
            if p.logprobs is not None:
                entry = logprob_entry(logits.base[row], token, p.logprobs)
                req.logprobs.append(entry)
                new_lp.append(entry)
            text = self.tokenizer.decode(req.output_ids)
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
        return StepOutput(req.request_id, new_ids, new_text, new_lp, reason is not None, reason)

    def _draft(self, req: Request, head_rows: torch.Tensor) -> None:
        """Set the request's drafts from its heads' logits (num_speculative, vocab) at its last token: no more
        than max_tokens and the context leave room for after the token the verify step is sure to add (step()
        has already cleared the last drafts)."""
        limit = min(self.num_speculative, req.params.max_tokens - len(req.output_ids) - 1,
                    self.max_model_len - req.num_tokens - 1)
        if limit > 0:
            req.draft_ids, req.draft_probs = draft(head_rows[:limit], req.params, req.generator)

    def _new_text(self, req: Request, final: bool) -> str:
        """Text not yet streamed, holding back an incomplete UTF-8 character or a possible stop-string start."""
        text, start = req.output_text, self._emitted[req.request_id]
        end = len(text)
        if not final:
            while end > start and text[end - 1] == "\ufffd":
                end -= 1
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
        """All prompts at once; returns params.n completions per prompt, in prompt order."""
        ids = []
        for i, prompt in enumerate(prompts):
            ids.append([self.add_request(prompt, _nth(params, j), f"gen-{i}-{j}") for j in range(params.n)])
        done: dict[str, Completion] = {}
        texts: dict[str, list] = {}
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(prompts) * params.n, desc="requests", unit="req")
        while self.has_unfinished():
            for out in self.step():
                acc = texts.setdefault(out.request_id, [[], "", []])
                acc[0] += out.new_token_ids
                acc[1] += out.new_text
                acc[2] += out.new_logprobs
                if out.finished:
                    done[out.request_id] = Completion(acc[1], acc[0], out.finish_reason, acc[2])
                    if bar:
                        bar.update(1)
        if bar:
            bar.close()
        return [[done[r] for r in group] for group in ids]


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
