"""Block manager and scheduler without a model: no block leaked or double-freed, whatever the traffic."""
import random

from hypothesis import given, settings
from hypothesis import strategies as st

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
