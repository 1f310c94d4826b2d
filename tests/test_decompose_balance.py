"""Dataset Decomposition buckets, curricula and rank balancing: pure functions, checked without a model."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from varlen.config import ModelConfig
from varlen.data.balance import CostModel, balance, imbalance, round_robin, target_weights
from varlen.data.decompose import (bucket_steps, check_range, decompose, schedule, sequences_per_step,
                                   step_chunks)

doc_lengths = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(lengths=doc_lengths, lo=st.integers(0, 4), span=st.integers(0, 6), keep=st.booleans())
def test_chunks_are_powers_of_two_inside_one_document_and_every_token_is_accounted(lengths, lo, span, keep):
    hi = lo + span
    dec = decompose(list(range(len(lengths))), lengths, lo, hi, keep_short=keep)
    covered = {d: [] for d in range(len(lengths))}
    for L, chunks in dec.buckets.items():
        for c in chunks:
            assert c.length & (c.length - 1) == 0, "chunk length is not a power of two"
            assert c.length == L or (keep and L == 2 ** lo and c.length < L)
            assert 0 <= c.start and c.start + c.length <= lengths[c.doc] - 1, "chunk leaves its document"
            covered[c.doc].append((c.start, c.length))
    kept = sum(c.length for chunks in dec.buckets.values() for c in chunks)
    assert kept + dec.dropped_tokens == sum(n - 1 for n in lengths)
    assert dec.kept_short_tokens == (sum(c.length for c in dec.buckets[2 ** lo] if c.length < 2 ** lo))
    for doc, spans in covered.items():  # no overlap within a document
        spans.sort()
        for (s0, l0), (s1, _) in zip(spans, spans[1:]):
            assert s0 + l0 <= s1


def test_binary_decomposition_of_one_document():
    dec = decompose([0], [201], lo=3, hi=7)  # 200 inputs = 128 + 64 + 8
    assert {L: [(c.start, c.length) for c in cs] for L, cs in dec.buckets.items() if cs} == \
        {128: [(0, 128)], 64: [(128, 64)], 8: [(192, 8)]}
    dec = decompose([0], [1000], lo=3, hi=8)  # 999 = 3 x 256 + 128 + 64 + 32 + 4 + 2 + 1
    assert [c.length for c in dec.buckets[256]] == [256] * 3 and dec.dropped_tokens == 7


@settings(max_examples=100, deadline=None)
@given(lengths=doc_lengths, hi=st.integers(3, 9), mult=st.integers(1, 4), seed=st.integers(0, 1000),
       curriculum=st.sampled_from(["uniform", "grow_p2", "shortest_first", "cyclic"]), cycles=st.integers(1, 4))
def test_tokens_per_step_are_constant_and_schedules_are_deterministic(lengths, hi, mult, seed, curriculum, cycles):
    tps = mult * 2 ** hi
    dec = decompose(list(range(len(lengths))), lengths, lo=2, hi=hi)
    steps = bucket_steps(dec, tps)
    order = schedule(steps, curriculum, seed, cycles)
    assert order == schedule(steps, curriculum, seed, cycles)
    assert {L: order.count(L) for L in steps if steps[L]} == {L: n for L, n in steps.items() if n}
    chunks = step_chunks(dec, order, tps, seed)
    for L, step in zip(order, chunks):
        assert len(step) == sequences_per_step(L, tps) and all(c.length == L for c in step)
        assert sum(c.length for c in step) == tps
    used = [(c.doc, c.start) for step in chunks for c in step]
    assert len(used) == len(set(used)), "a chunk was used twice in one epoch"


def test_grow_p2_starts_short_and_ends_long():
    steps = {16: 200, 64: 200, 256: 200}
    order = schedule(steps, "grow_p2", seed=0, cycles=1)
    first, last = order[:100], order[-100:]
    assert np.mean(first) < np.mean(last)
    assert first.count(16) > first.count(256) and last.count(256) > last.count(16)
    two = schedule(steps, "grow_p2", seed=0, cycles=2)
    half = len(two) // 2
    assert {L: two[:half].count(L) for L in steps} == {L: 100 for L in steps}  # each cycle holds its share
    assert schedule(steps, "shortest_first", 0) == [16] * 200 + [64] * 200 + [256] * 200
    assert schedule({8: 2, 16: 2, 32: 1}, "cyclic", 0) == [8, 16, 32, 16, 8]


@pytest.mark.parametrize("lo,hi,tps,word", [(3, 2, 1024, "dd_lo"), (-1, 4, 1024, "dd_lo"), (2, 11, 1024, "tokens_per_step"),
                                            (2, 8, 1000, "multiple")])
def test_bad_bucket_options_name_the_option(lo, hi, tps, word):
    with pytest.raises(ValueError, match=word):
        check_range(lo, hi, tps)
    with pytest.raises(ValueError, match="curriculum"):
        schedule({8: 1}, "random_walk", 0)


long_tailed = st.lists(st.integers(min_value=1, max_value=64) | st.integers(min_value=500, max_value=8192),
                       min_size=1, max_size=120)


@settings(max_examples=200, deadline=None)
@given(lengths=long_tailed, ranks=st.integers(1, 8))
def test_balance_assigns_each_sequence_once_within_the_greedy_bound(lengths, ranks):
    cost = CostModel.from_flops(ModelConfig(dim=256, n_layer=4, n_head=4, n_kv_head=2))
    groups = balance(lengths, ranks, cost)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    totals = [sum(cost(lengths[i]) for i in g) for g in groups]
    mean = sum(totals) / ranks
    assert max(totals) <= mean + max(cost(n) for n in lengths) + 1e-6 * mean  # list-scheduling bound
    assert max(totals) <= max(sum(cost(lengths[i]) for i in g) for g in round_robin(lengths, ranks)) * 1.34
    assert abs(sum(target_weights(groups, lengths)) - 1) < 1e-12


def test_balance_beats_round_robin_on_a_long_tailed_step():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(7, 1.2, 256), 16, 8192)]
    cost = CostModel.from_flops(ModelConfig(dim=256, n_layer=4, n_head=4, n_kv_head=2))
    for ranks in (2, 4, 8):
        assert imbalance(balance(lengths, ranks, cost), lengths, cost) <= 1.05
        assert imbalance(round_robin(lengths, ranks), lengths, cost) > 1.05
