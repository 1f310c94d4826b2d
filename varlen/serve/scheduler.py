"""Continuous batching: which requests run in the next forward, and how many of their tokens (pure).

Every step packs, under a token budget, (1) one token for each running request that is decoding, then
(2) chunks of prefills, running ones first, then waiting requests in arrival order. A waiting request is
admitted only when its blocks fit, and nobody overtakes the head of the queue, so no request starves.
When a decode needs a block and none is free, the youngest running request is preempted: its blocks are
freed and it waits at the front of the queue to be recomputed (its generated tokens are kept).

With speculative decoding a decoding request also runs its draft tokens (Request.draft_ids) after its last
token, as many as the budget left after every other decode's own token and the free blocks allow; drafts
never preempt anyone, since they may all be rejected.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .request import Request, Status


@dataclass
class StepPlan:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)  # (request, tokens to run)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks, self.max_num_seqs, self.budget = blocks, max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._arrivals = 0

    def add(self, req: Request) -> None:
        req.arrival, self._arrivals = self._arrivals, self._arrivals + 1
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self.blocks.free_request(req)
        req.num_computed = req.num_cached = 0
        req.draft_ids, req.draft_probs = [], None  # drafting restarts from the recomputed prefill
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        plan.preempted.append(req)

    def schedule(self) -> StepPlan:
        plan, budget = StepPlan(), self.budget
        # 1. Decodes, oldest first; a decode that cannot get its block preempts the youngest request.
        decoding = [r for r in sorted(self.running, key=lambda r: r.arrival) if r.num_pending == 1]
        for i, req in enumerate(decoding):
            if req not in self.running or budget < 1:
                continue
            while not self.blocks.can_append(req, req.num_tokens):
                victim = max(self.running, key=lambda r: r.arrival)
                self._preempt(victim, plan)
                if victim is req:
                    break
            if req in self.running:
                # Drafts only from budget no later decode needs for its own token, and only into free blocks.
                num_drafts = max(0, min(len(req.draft_ids), budget - 1 - (len(decoding) - 1 - i)))
                while num_drafts and not self.blocks.can_append(req, req.num_tokens + num_drafts):
                    num_drafts -= 1
                self.blocks.append(req, req.num_tokens + num_drafts)
                plan.scheduled.append((req, 1 + num_drafts))
                budget -= 1 + num_drafts
        # 2. Prefills already running (chunked), oldest first.
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.num_pending > 1 and budget > 0:
                n = min(req.num_pending, budget)
                plan.scheduled.append((req, n))
                budget -= n
        # 3. Admit waiting requests in order while their blocks, a sequence slot and some budget remain.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if not self.blocks.can_allocate(req):
                break
            self.waiting.popleft()
            self.blocks.allocate(req)
            req.status = Status.RUNNING
            self.running.append(req)
            n = min(req.num_pending, budget)
            plan.scheduled.append((req, n))
            budget -= n
        return plan

    def commit(self, req: Request, num_computed: int) -> None:
        """After a forward: the cache holds valid K/V for the request's first num_computed tokens. Full blocks
        among them join the prefix cache; blocks that held only rejected drafts are given back."""
        assert num_computed <= req.num_tokens, "K/V of a token the request does not hold"
        req.num_computed = num_computed
        self.blocks.mark_computed(req)
        self.blocks.truncate(req, req.num_tokens)

    def finish(self, req: Request, reason: str) -> None:
        """Stop a request (done, or cancelled) and free its blocks at once."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.blocks.free_request(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status, req.finish_reason = Status.FINISHED, reason
        req.draft_ids, req.draft_probs = [], None
