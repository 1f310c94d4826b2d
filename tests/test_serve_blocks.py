"""Block manager and scheduler without a model: no block leaked or double-freed, whatever the traffic."""
import hashlib
import random
from unittest import mock

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from varlen.serve import block_manager
from varlen.serve.block_manager import BlockManager
from varlen.serve.request import Request, SamplingParams, Status
from varlen.serve.scheduler import Scheduler


def fake_step(sched: Scheduler, rng: random.Random, vocab: int) -> None:
    """What the engine does after a forward, with a random 'sampled' token."""
    plan = sched.schedule()
    for req, n in plan.scheduled:
        assert req.status is Status.RUNNING and 1 <= n <= req.num_pending
        assert len(req.block_table) * sched.blocks.block_size >= req.num_computed + n, "token without a slot"
        req.num_computed += n
        sched.blocks.mark_computed(req)
        if req.num_computed == req.num_tokens:
            req.output_ids.append(rng.randrange(vocab))
            if len(req.output_ids) >= req.params.max_tokens:
                sched.finish(req, "length")
    assert plan.num_tokens <= sched.budget


ops = st.lists(st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]), st.integers(0, 10 ** 6)),
               min_size=1, max_size=80)


def run_traffic(ops, blocks: BlockManager, sched: Scheduler, step, check=lambda running, live: None) -> None:
    """Random arrivals, steps and aborts, then a drain; block invariants checked after every operation.

    step(sched, rng) plays the engine after one forward; check(running, live) adds a caller's own checks."""
    live: list[Request] = []
    shared = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]  # a common prefix, so prefix-cache hits happen
    capacity = blocks.num_blocks * blocks.block_size
    for i, (op, x) in enumerate(ops):
        rng = random.Random(x)
        if op == "add":
            n_prompt = rng.randint(1, 30)
            max_tokens = rng.randint(1, 20)
            if n_prompt + max_tokens > capacity:  # the engine refuses what can never fit
                continue
            prompt = (shared[:rng.randint(0, len(shared))] + [rng.randrange(6) for _ in range(n_prompt)])[:n_prompt]
            req = Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens))
            sched.add(req)
            live.append(req)
        elif op == "step":
            step(sched, rng)
        elif op == "abort" and live:
            req = live[x % len(live)]
            if not req.is_finished:
                sched.finish(req, "abort")
        live = [r for r in live if not r.is_finished]
        running = [r for r in live if r.status is Status.RUNNING]
        blocks.check(running)
        check(running, live)
        assert all(not r.block_table for r in live if r.status is Status.WAITING)
    # Drain: every request finishes and every block comes back.
    for _ in range(10_000):
        if not sched.has_work():
            break
        step(sched, random.Random(0))
        blocks.check(sched.running)
        check(sched.running, sched.running)
    assert not sched.has_work(), "requests starved: the queue never drained"
    assert blocks.num_free_blocks == blocks.num_blocks


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 6), caching=st.booleans())
def test_no_block_leaked_or_double_freed(ops, num_blocks, block_size, budget, max_seqs, caching):
    blocks = BlockManager(num_blocks, block_size, caching)
    run_traffic(ops, blocks, Scheduler(blocks, max_seqs, budget), lambda sched, rng: fake_step(sched, rng, vocab=6))


def test_prefix_hits_share_blocks_and_leave_the_last_token_to_compute():
    blocks = BlockManager(16, 4)
    a = Request("a", list(range(12)), SamplingParams())
    blocks.allocate(a)
    a.num_computed = 12
    blocks.mark_computed(a)
    b = Request("b", list(range(12)), SamplingParams())
    blocks.allocate(b)
    # 12 tokens = 3 full blocks, but the block with the last token is recomputed for its logits.
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_computed == b.num_cached == 8
    c = Request("c", list(range(8)) + [99, 98, 97, 96, 95], SamplingParams())
    blocks.allocate(c)
    assert c.block_table[:2] == a.block_table[:2] and c.num_cached == 8
    assert blocks.ref_counts[a.block_table[0]] == 3
    for r in (a, b, c):
        blocks.free_request(r)
    assert blocks.num_free_blocks == 16
    d = Request("d", list(range(12)) + [1], SamplingParams())
    blocks.allocate(d)  # a's blocks were freed but keep their hash until reused
    assert d.num_cached == 12


def test_fcfs_admission_never_lets_a_small_request_overtake_the_head():
    blocks = BlockManager(4, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=100)
    big = Request("big", [1] * 12, SamplingParams(max_tokens=4))
    sched.add(big)
    sched.schedule()                                 # big holds 3 of 4 blocks
    head = Request("head", [2] * 8, SamplingParams(max_tokens=1))
    small = Request("small", [3], SamplingParams(max_tokens=1))
    sched.add(head)
    sched.add(small)
    plan = sched.schedule()
    admitted = {r.request_id for r, _ in plan.scheduled}
    assert "head" not in admitted and "small" not in admitted, "head cannot fit; small must wait behind it"
    assert [r.request_id for r in sched.waiting] == ["head", "small"]


# ---------------------------------------------------------------- prefix cache keys: the whole prefix must match
def computed(blocks: BlockManager, rid: str, ids: list[int]) -> Request:
    """A request allocated and run to the end of its prompt, its full blocks registered."""
    req = Request(rid, ids, SamplingParams())
    blocks.allocate(req)
    req.num_computed = len(ids)
    blocks.mark_computed(req)
    return req


def test_an_equal_block_after_a_different_one_is_not_shared():
    blocks = BlockManager(16, 4)
    a = computed(blocks, "a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    b = computed(blocks, "b", [0, 2, 3, 4, 5, 6, 7, 8, 9])  # block 1 holds the same tokens, after another block 0
    assert b.num_cached == 0 and set(a.block_table).isdisjoint(b.block_table)
    assert blocks.block_digest[a.block_table[1]] != blocks.block_digest[b.block_table[1]]
    c = computed(blocks, "c", [1, 2, 3, 4, 5, 6, 7, 8, 10])  # the same prefix is shared
    assert c.block_table[:2] == a.block_table[:2] and c.num_cached == 8


def test_the_key_is_a_sha256_chain_over_int64_ids():
    blocks = BlockManager(8, 2)
    a = computed(blocks, "a", [7, 300000, 2 ** 40, 5, 1])
    d0 = hashlib.sha256(np.asarray([7, 300000], dtype=np.int64).tobytes()).digest()
    d1 = hashlib.sha256(d0 + np.asarray([2 ** 40, 5], dtype=np.int64).tobytes()).digest()
    assert [blocks.block_digest[b] for b in a.block_table[:2]] == [d0, d1]
    assert blocks.cached == {d0: a.block_table[0], d1: a.block_table[1]}


def test_colliding_digests_never_share_a_wrong_block():
    """With every digest forced equal, hits still need the same tokens after the same parent block."""
    with mock.patch.object(block_manager, "chain_digest", lambda parent, tokens: b"\0" * 32):
        blocks = BlockManager(16, 4)
        a = computed(blocks, "a", [5, 5, 5, 5, 1])
        b = computed(blocks, "b", [5, 5, 5, 5, 5, 5, 5, 5, 1])  # block 1 has a's block 0's tokens, not its prefix
        assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[0] and b.num_cached == 4
        c = computed(blocks, "c", [6, 6, 6, 6, 5, 5, 5, 5, 1])
        assert c.num_cached == 0 and a.block_table[0] not in c.block_table


@settings(max_examples=100, deadline=None)
@given(prompts=st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=12),
       block_size=st.sampled_from([1, 2, 3]), collide=st.booleans())
def test_every_hit_holds_exactly_the_prompts_prefix(prompts, block_size, collide):
    """Prompts over a 3-token vocabulary share blocks often; a hit must hold the same whole prefix, even when
    every digest collides. Few blocks, so blocks are evicted and handed out again."""
    blocks, live, prefix_of = BlockManager(10, block_size), [], {}
    fake = (lambda parent, tokens: b"\0" * 32) if collide else block_manager.chain_digest
    with mock.patch.object(block_manager, "chain_digest", fake):
        for i, ids in enumerate(prompts):
            req = Request(f"r{i}", ids, SamplingParams())
            while live and not blocks.can_allocate(req):
                blocks.free_request(live.pop(0))
            if not blocks.can_allocate(req):
                continue
            blocks.allocate(req)
            # A block handed out again (its registration dropped) will hold a new prefix: forget the old one.
            prefix_of = {b: p for b, p in prefix_of.items() if blocks.block_digest[b] is not None}
            for j, block in enumerate(req.block_table[:req.num_cached // block_size]):
                assert prefix_of[block] == tuple(ids[:(j + 1) * block_size]), "a block of another prefix was shared"
            req.num_computed = len(ids)
            blocks.mark_computed(req)
            for j, block in enumerate(req.block_table[:len(ids) // block_size]):
                prefix_of.setdefault(block, tuple(ids[:(j + 1) * block_size]))
            live.append(req)
            blocks.check(live)


def test_hit_rate_counts_lookups_at_allocate_only():
    blocks = BlockManager(16, 4)
    assert blocks.num_cache_queries == blocks.num_cache_hits == 0 and blocks.cache_hit_rate == 0.0
    computed(blocks, "a", list(range(12)))         # blocks 0-1 looked up (block 2 holds the last token): misses
    assert (blocks.num_cache_queries, blocks.num_cache_hits) == (2, 0)
    b = Request("b", list(range(12)), SamplingParams())
    for _ in range(3):
        assert blocks.can_allocate(b)              # the scheduler may ask every step: not a lookup to count
    assert blocks.num_cache_queries == 2
    blocks.allocate(b)
    assert (blocks.num_cache_queries, blocks.num_cache_hits) == (4, 2) and blocks.cache_hit_rate == 0.5
    computed(blocks, "c", [1])                     # one token: no full block before the last, nothing to look up
    assert blocks.num_cache_queries == 4
    off = BlockManager(16, 4, prefix_caching=False)
    computed(off, "a", list(range(12)))
    computed(off, "b", list(range(12)))
    assert off.num_cache_queries == off.num_cache_hits == 0 and off.cache_hit_rate == 0.0
