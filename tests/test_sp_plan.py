"""Sequence-parallel step planning: pure, checked against a brute force and against balance()."""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varlen.config import ModelConfig
from varlen.data.balance import CostModel, balance
from varlen.data.sp_plan import (EXACT_MAX_RANKS, EXACT_MAX_SEQS, MAX_PARTITIONS, Group, Plan, SPCost, cut_to_cap,
                                 full_context_share, partitions, plan_step)


@st.composite
def steps(draw, max_ranks=16, max_seqs=40):
    """A step: lengths, ranks, per-rank cap, allowed degrees (1, some divisors, maybe awkward ones), cost."""
    ranks = draw(st.integers(1, max_ranks))
    divisors = [d for d in range(1, ranks + 1) if ranks % d == 0]
    degrees = sorted({1, *draw(st.lists(st.sampled_from(divisors), max_size=3)),
                      *draw(st.lists(st.integers(1, ranks), max_size=2))})
    cap = draw(st.integers(1, 300))
    lengths = draw(st.lists(st.integers(1, degrees[-1] * cap), max_size=max_seqs))
    cost = SPCost(1.0, draw(st.sampled_from([0.0, 1 / 512])), draw(st.sampled_from([0.0, 0.1, 2.0])))
    return lengths, ranks, cap, degrees, cost


def check_plan(plan: Plan, lengths, ranks, cap, degrees):
    assert sorted(i for g in plan.groups for i in g.seqs) == list(range(len(lengths))), "sequence lost or doubled"
    assert [r for g in plan.groups for r in g.ranks] == list(range(ranks)), "groups do not tile the ranks in order"
    assert list(plan.degrees) == sorted(plan.degrees, reverse=True), "larger groups first"
    for g in plan.groups:
        assert g.degree in degrees
        assert list(g.seqs) == sorted(g.seqs)
        assert all(g.degree * cap >= lengths[i] for i in g.seqs), "a sequence exceeds its group's cap"
        assert all(plan.degree_of_rank(r) == g.degree and plan.group_of(r) == g for r in g.ranks)
    shares = plan.rank_tokens(lengths)
    assert len(shares) == ranks and sum(shares) == sum(lengths)


def seq_time(cost, n, d):  # the formula, written out again so the brute force does not trust SPCost
    return (cost.a * n + cost.b * n * n) / d + cost.c * n * (d - 1) / d ** 2


def brute_force(lengths, ranks, cap, degrees, cost):
    """Least makespan over every partition of the ranks and every assignment of sequences to its groups."""
    best = float("inf")
    for k in range(1, ranks + 1):
        for parts in itertools.combinations_with_replacement(sorted(degrees), k):
            if sum(parts) != ranks:
                continue
            for assign in itertools.product(range(k), repeat=len(lengths)):
                if any(parts[g] * cap < n for g, n in zip(assign, lengths)):
                    continue
                loads = [0.0] * k
                for g, n in zip(assign, lengths):
                    loads[g] += seq_time(cost, n, parts[g])
                best = min(best, max(loads))
    return best


@settings(max_examples=300, deadline=None)
@given(step=steps())
def test_every_plan_keeps_each_sequence_once_on_a_group_that_can_hold_it(step):
    lengths, ranks, cap, degrees, cost = step
    plan = plan_step(lengths, ranks, cost, cap, degrees)
    check_plan(plan, lengths, ranks, cap, degrees)
    assert plan_step(list(lengths), ranks, cost, cap, list(reversed(degrees))) == plan, "not deterministic"
    span = plan.makespan(lengths, cost)
    for d in degrees:  # the one-size baselines are always scored, so auto never loses to them
        if ranks % d == 0 and d * cap >= max(lengths, default=0):
            static = plan_step(lengths, ranks, cost, cap, mode="static", static_degree=d)
            check_plan(static, lengths, ranks, cap, [d])
            assert span <= static.makespan(lengths, cost) * (1 + 1e-9)


@settings(max_examples=150, deadline=None)
@given(step=steps(max_ranks=4, max_seqs=6))
def test_small_steps_are_solved_exactly(step):
    lengths, ranks, cap, degrees, cost = step
    assert len(lengths) <= EXACT_MAX_SEQS and ranks <= EXACT_MAX_RANKS
    got = plan_step(lengths, ranks, cost, cap, degrees).makespan(lengths, cost)
    want = brute_force(lengths, ranks, cap, degrees, cost)
    assert abs(got - want) <= 1e-9 * max(want, 1e-300)


def test_exact_regime_beats_greedy_balance_at_its_threshold():
    lengths, cost = [25, 22, 7, 4, 16, 13, 9, 7], SPCost(1.0, 0.0, 0.0)  # 8 sequences, 4 ranks
    greedy = max(sum(lengths[i] for i in g) for g in balance(lengths, 4, cost))
    plan = plan_step(lengths, 4, cost, cap=100, degrees=(1,))
    assert greedy == 29 and plan.makespan(lengths, cost) == 27 == brute_force(lengths, 4, 100, [1], cost)


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 4096), max_size=60), ranks=st.integers(1, 8), c=st.sampled_from([0.0, 1.0]))
def test_data_parallel_plan_is_balance(lengths, ranks, c):
    cost = SPCost(1.0, 1 / 1024, c)
    want = balance(lengths, ranks, CostModel(1.0, 1 / 1024))
    plan = plan_step(lengths, ranks, cost, cap=4096, mode="dp")
    assert plan.degrees == (1,) * ranks and [list(g.seqs) for g in plan.groups] == want
    assert plan_step(lengths, ranks, cost, cap=4096, mode="static", static_degree=1) == plan
    span = max(sum(cost(lengths[i]) for i in g) for g in want)
    auto = plan_step(lengths, ranks, cost, cap=4096, degrees=(1,))
    assert auto.makespan(lengths, cost) <= span * (1 + 1e-12)
    if len(lengths) > EXACT_MAX_SEQS or ranks > EXACT_MAX_RANKS:
        assert auto == plan


def long_tailed(n, seed, hi):
    rng = np.random.default_rng(seed)
    return [int(x) for x in np.clip(rng.lognormal(7, 1.0, n), 16, hi)]


def test_auto_beats_static_sp_on_a_long_tailed_step_and_is_dp_when_everything_fits():
    cost = SPCost(1.0, 1 / 4096, 0.5)  # attention = matmuls at 4096 tokens; all-to-all half a token's compute
    lengths = long_tailed(120, 0, 4096) + [30000, 12000]  # two documents only several ranks hold
    plan = plan_step(lengths, 16, cost, cap=4096)
    check_plan(plan, lengths, 16, 4096, [1, 2, 4, 8, 16])
    static = plan_step(lengths, 16, cost, cap=4096, mode="static", static_degree=16)
    assert plan.makespan(lengths, cost) < 0.9 * static.makespan(lengths, cost)  # 0.87 here
    assert plan.degree_of_rank(0) == 8 and plan.degree_of_rank(15) == 1  # 30000 tokens need 8 ranks; short: 1
    with pytest.raises(ValueError, match="30000"):
        plan_step(lengths, 16, cost, cap=4096, mode="dp")

    short = long_tailed(200, 1, 4096)  # splitting any of these only adds all-to-all time
    auto, dp = plan_step(short, 8, cost, cap=4096), plan_step(short, 8, cost, cap=4096, mode="dp")
    assert auto == dp and auto.degrees == (1,) * 8


def test_a_64_rank_step_is_planned_within_its_groups():
    cost = SPCost(1.0, 1 / 4096, 0.5)
    lengths = long_tailed(256, 2, 16 * 4096)
    plan = plan_step(lengths, 64, cost, cap=4096)
    check_plan(plan, lengths, 64, 4096, [1, 2, 4, 8, 16, 32, 64])
    assert plan == plan_step(lengths, 64, cost, cap=4096)
    for d in (16, 32, 64):
        static = plan_step(lengths, 64, cost, cap=4096, mode="static", static_degree=d)
        assert plan.makespan(lengths, cost) <= static.makespan(lengths, cost)


def test_empty_step_is_one_idle_rank_per_group():
    plan = plan_step([], 4, SPCost(1.0, 0.0, 1.0), cap=8)
    assert plan == Plan(tuple(Group((r,), ()) for r in range(4)))
    assert plan.makespan([], SPCost(1.0, 0.0, 1.0)) == 0.0 and plan.rank_tokens([]) == [0, 0, 0, 0]


def test_plan_helpers_on_a_hand_made_plan():
    plan = Plan((Group((0, 1, 2, 3), (0,)), Group((4, 5), (1, 2)), Group((6,), (3,)), Group((7,), ())))
    lengths = [10, 5, 4, 3]
    assert plan.rank_tokens(lengths) == [3, 3, 2, 2, 5, 4, 3, 0]  # 10 = 3+3+2+2; 5 = 3+2 and 4 = 2+2
    assert plan.degree_of_rank(5) == 2 and plan.group_of(6).seqs == (3,) and plan.num_ranks == 8
    cost = SPCost(1.0, 0.5, 2.0)
    assert plan.times(lengths, cost) == pytest.approx([seq_time(cost, 10, 4), seq_time(cost, 5, 2) +
                                                       seq_time(cost, 4, 2), seq_time(cost, 3, 1), 0.0])
    assert plan.makespan(lengths, cost) == max(plan.times(lengths, cost))
    with pytest.raises(ValueError, match="rank 8"):
        plan.group_of(8)


def test_sp_cost_extends_the_data_parallel_cost():
    base = CostModel.from_flops(ModelConfig(dim=256, n_layer=4, n_head=4, n_kv_head=2))
    cost = SPCost.from_cost(base, c=3.0)
    assert (cost.a, cost.b, cost.c) == (base.a, base.b, 3.0)
    assert cost.seq_time(1000, 1) == base(1000) and cost(1000) == base(1000)
    assert cost.seq_time(1000, 4) == pytest.approx(base(1000) / 4 + 3.0 * 1000 * 3 / 16)
    lengths = long_tailed(50, 3, 4096)
    assert balance(lengths, 4, cost) == balance(lengths, 4, base)  # still a CostModel to balance()
    # a plain CostModel plans as free communication
    assert plan_step(lengths, 4, base, 4096) == plan_step(lengths, 4, SPCost.from_cost(base, 0.0), 4096)


def test_partitions():
    assert set(partitions(4, (1, 2, 4))) == {(4,), (2, 2), (2, 1, 1), (1, 1, 1, 1)}
    assert len(partitions(64, (1, 2, 4, 8, 16, 32, 64))) == 1828
    assert all(p[0] >= 4 for p in partitions(8, (1, 2, 4, 8), need=4))
    assert partitions(3, (2,)) == ()
    awkward = partitions(64, tuple(range(1, 65)))  # 1.7 million in all: truncated, baselines kept
    assert len(awkward) <= MAX_PARTITIONS + 64 and all(sum(p) == 64 for p in awkward)
    assert {(64,), (32, 32), (1,) * 64} <= set(awkward)


@pytest.mark.parametrize("kwargs,words", [
    (dict(ranks=0), ["at least one rank"]),
    (dict(cap=0), ["data.rank_tokens"]),
    (dict(lengths=[5, 0]), ["positive"]),
    (dict(degrees=(1, 16)), ["degrees", "1..ranks=8"]),
    (dict(degrees=(0, 1)), ["degrees"]),
    (dict(lengths=[100, 9000]), ["9000 tokens", "cap 1000", "raise data.rank_tokens or allow a larger "
                                                              "sequence-parallel degree"]),
    (dict(lengths=[100, 5000], degrees=(1, 2, 4)), ["5000 tokens", "cap 1000", "4 ranks"]),
    (dict(lengths=[1500], mode="dp"), ["1500", "cap=1000", "cut_to_cap"]),
    (dict(lengths=[2500], mode="static", static_degree=2), ["2500 tokens", "cap 1000", "static degree"]),
    (dict(mode="static", static_degree=3), ["static_degree dividing ranks=8"]),
    (dict(mode="static"), ["static_degree"]),
    (dict(mode="static", static_degree=4, degrees=(1, 2)), ["not among the allowed degrees"]),
    (dict(static_degree=2), ["only applies to mode='static'"]),
    (dict(mode="flex"), ["unknown mode 'flex'"]),
    (dict(degrees=(3,)), ["no partition of 8 ranks"]),
])
def test_bad_inputs_name_the_input_and_the_fix(kwargs, words):
    args = dict(lengths=[100, 200], ranks=8, cost=SPCost(1.0, 0.0, 1.0), cap=1000) | kwargs
    with pytest.raises(ValueError) as err:
        plan_step(**args)
    for w in words:
        assert w in str(err.value)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 5000), max_size=30), cap=st.integers(1, 2000))
def test_cut_to_cap_keeps_every_token_in_pieces_of_at_most_cap(lengths, cap):
    pieces = cut_to_cap(lengths, cap)
    assert sum(pieces) == sum(lengths) and all(1 <= p <= cap for p in pieces)
    assert len(pieces) == sum(-(-n // cap) for n in lengths)
    share = full_context_share(lengths, cap)
    assert 0 < share <= 1 and (share == 1) == (max(lengths, default=0) <= cap)


def test_cut_to_cap_and_full_context_share_by_hand():
    assert cut_to_cap([10, 3, 8], 4) == [4, 4, 2, 3, 4, 4]
    assert full_context_share([10, 3, 8], 4) == (4 + 3 + 4) / 21
    assert full_context_share([10, 3, 8], 10) == 1.0 and full_context_share([], 4) == 1.0


def test_flop_cost_model_prices_the_all_to_all():
    from varlen.config import ModelConfig
    cfg = ModelConfig(dim=256, n_layer=4, n_head=8, n_kv_head=2)
    cost, base = SPCost.from_flops(cfg), CostModel.from_flops(cfg)
    assert (cost.a, cost.b) == (base.a, base.b)
    # q, k, v out and the output back, forward and backward, 4-byte elements, priced per byte
    assert cost.c == pytest.approx(4 * 2 * (2 * 8 + 2 * 2) * 32 * 4 * 20.0)
    # splitting costs something now: a sequence that fits one rank is cheaper there
    assert cost.seq_time(1000, 2) * 2 > cost.seq_time(1000, 1)
