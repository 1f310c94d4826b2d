"""Serving with a compiled forward (--compile) gives the eager engine's tokens and log-probabilities, compiles
every graph before the first request, and falls back to eager serving where it cannot compile."""
import copy
import logging

import pytest
import torch

from varlen.config import ServeConfig
from varlen.model.quant import int8_rows
from varlen.serve import compiled
from varlen.serve.engine import Engine
from varlen.serve.request import SamplingParams

from .test_serve_engine import CFG, model, tokenizer  # noqa: F401 (fixtures)
from .test_speculate import cycle  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not compiled.available(), reason="this torch has no opaque objects for custom ops")


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, CFG.vocab_size, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("quantization", ["none", pytest.param("int8", marks=pytest.mark.slow)])  # int8: ~55 s
def test_compiled_engine_equals_eager_and_compiles_only_at_start(model, tokenizer, quantization, monkeypatch):
    if quantization == "int8":
        # A crossover fixed rather than timed, so both engines branch alike and the test is the same every run.
        from varlen.model import quant
        monkeypatch.setattr(quant, "int8_crossover", lambda *a, **k: 3)
    # Small steps force chunked prefills beside decodes: every kind of step the scheduler makes.
    # Autotuning (C++ GEMM templates compiled and timed) with int8, where it pays; the fp32 case starts quicker.
    cfg = dict(kv_cache_gib=0.01, dtype="float32", max_num_batched_tokens=48, max_num_seqs=5,
               quantization=quantization, autotune=quantization == "int8")
    eager = Engine(copy.deepcopy(model), tokenizer, ServeConfig(**cfg))
    comp = Engine(copy.deepcopy(model), tokenizer, ServeConfig(**cfg, compile=True))
    assert comp.runner.step_fn is not None and eager.runner.step_fn is None
    assert int8_rows(comp.model) == (3 if quantization == "int8" else None)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 3  # one token; one sequence of several; several sequences (int8: each both sides of 3 rows)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    batch = prompts(9)
    want = eager.generate(batch, params)
    decode, steps = comp.runner.step_fn.decode, []
    comp.runner.step_fn.decode = lambda *a: steps.append(a[0].shape[0]) or decode(*a)
    got = comp.generate(batch, params)
    assert steps and max(steps) > 1, "no decode step (of several sequences) ran the in-graph attention"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a graph compiled while serving"
    for w, g in zip(want, got):
        assert g[0].token_ids == w[0].token_ids
        assert [e["logprob"] for e in g[0].logprobs] == pytest.approx([e["logprob"] for e in w[0].logprobs],
                                                                         abs=1e-4)
    comp.blocks.check([])  # every block back (the warm-up requests included)


@pytest.mark.slow  # two compiles (~45 s)
def test_two_compiled_engines_in_one_process_each_run_their_own_weights():
    # Graphs freeze their weights; two models of one class must not share them (dynamo caches per code object).
    from varlen.config import ModelConfig
    from varlen.model.transformer import Transformer

    from .test_speculate import Letters
    cfg = ModelConfig(vocab_size=48, dim=48, n_layer=1, n_head=4, n_kv_head=2, max_seq_len=64, tie_embeddings=False)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    batch = [[3, 4, 5, 6, 7, 8, 9], [5, 6]]
    outs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = Transformer(cfg)
        with torch.no_grad():
            m.lm_head.weight.mul_(20)  # sharp logits: no near-ties, and the two models' outputs differ
        want = [o[0].token_ids for o in Engine(copy.deepcopy(m), Letters(), ServeConfig(kv_cache_gib=0.01)).generate(
            batch, params)]
        comp = Engine(m, Letters(), ServeConfig(kv_cache_gib=0.01, compile=True, autotune=False))
        assert [o[0].token_ids for o in comp.generate(batch, params)] == want
        outs.append(want)
    assert outs[0] != outs[1]


def test_compile_falls_back_to_eager_with_a_reason(model, tokenizer, caplog, monkeypatch):
    monkeypatch.setattr(compiled, "available", lambda: False)  # a torch without opaque objects
    with caplog.at_level(logging.WARNING, logger="varlen.serve.engine"):
        eng = Engine(copy.deepcopy(model), tokenizer, ServeConfig(kv_cache_gib=0.01, dtype="float32", compile=True))
    assert eng.runner.step_fn is None
    assert any("--compile ignored" in r.message and "opaque objects" in r.message for r in caplog.records)
    [[out]] = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3


# mlp heads in the default suite (cheaper to compile); block heads, whose cache layers the graphs also fill, slow.
@pytest.mark.parametrize("cycle", [pytest.param("block", marks=pytest.mark.slow), "mlp"], indirect=True)
def test_compiled_speculative_decoding_equals_ordinary_decoding(cycle):
    # Drafts verified through the compiled graphs give ordinary greedy decoding's tokens; a verify step of one
    # sequence (the batch-1 case) runs the decode graph of 1 + drafts new tokens, compiled before serving.
    from .test_speculate import CYCLE_V, Letters, busy_requests, engine, ordinary, run
    tok = Letters()
    reqs = busy_requests(CYCLE_V, seed=3)
    want = ordinary(cycle, tok, reqs)
    eng = engine(copy.deepcopy(cycle), tok, speculative=True, compile=True, autotune=False)
    assert eng.runner.step_fn is not None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    decode, queries = eng.runner.step_fn.decode, []
    eng.runner.step_fn.decode = lambda ids, p, slots, *a: queries.append(
        (slots.shape[0], ids.shape[0] // slots.shape[0])) or decode(ids, p, slots, *a)
    got, most = run(eng, reqs)
    assert got == want
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a graph compiled while serving"
    assert most == 4 and eng.spec_stats.tokens_per_step > 2.5
    assert any(b > 1 and q > 1 for b, q in queries), queries  # several sequences verifying in the graph
    # Alone, a request prefills in the general graph and then verifies every step in the decode graph.
    queries.clear()
    rid, prompt, params, _ = next(r for r in reqs if len(r[1]) > 4)
    step, steps = eng.step, []
    eng.step = lambda: steps.append(1) or step()
    assert run(eng, [(rid, prompt, params, 0)])[0][rid] == want[rid]
    assert len(queries) == len(steps) - 1 and all(b == 1 for b, _ in queries), (queries, len(steps))
    assert (1, 4) in queries  # the last token and 3 drafts


def _decode_step(ctxs, seed=0, hkv=2, h=6, d=8, layers=2, queries=1):
    """A step of `queries` new tokens per sequence (1: decoding) over a 2-layer cache whose contexts (new
    tokens included) are scattered."""
    from varlen.batch import Batch, PagedBatch
    g = torch.Generator().manual_seed(seed)
    total = sum(ctxs)
    slots = torch.randperm(total + 7, generator=g)[:total]
    k_cache = torch.randn(layers, total + 7, hkv, d, generator=g)
    v_cache = torch.randn(layers, total + 7, hkv, d, generator=g)
    ends = torch.cumsum(torch.tensor(ctxs), 0)
    new = torch.cat([torch.arange(e - queries, e) for e in ends.tolist()])
    base = Batch.from_seqlens([queries] * len(ctxs))
    positions = torch.cat([torch.arange(c - queries, c) for c in ctxs])
    batch = PagedBatch(base.cu_seqlens, positions, queries, context_lens=list(ctxs), slot_mapping=slots[new],
                       context_slots=slots, k_cache=k_cache, v_cache=v_cache)
    T = len(ctxs) * queries
    q, k, v = (torch.randn(T, n, d, generator=g) for n in (h, hkv, hkv))
    return batch, q, k, v


def test_decode_inputs_pad_each_context_and_keep_the_new_key():
    from varlen.model.attention import paged
    batch, *_ = _decode_step([4, 6, 3])
    slots, mask = paged.decode_inputs(batch)
    assert slots.shape == (3, 5) and mask.shape == (3, 5)
    cs = batch.context_slots
    assert slots[1].tolist() == cs[4:9].tolist()                          # the 5 cached tokens of sequence 1
    assert slots[0, :3].tolist() == cs[0:3].tolist() and slots[0, 3:].tolist() == [int(cs[0])] * 2
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [True] * 2 + [False] * 3]
    assert paged.decode_inputs(_decode_step([2])[0])[0].shape == (1, 2)   # at least 2 keys: no size-1 graph
    slots, mask = paged.decode_inputs(_decode_step([1, 3])[0])             # a one-token prompt: its own key only
    assert mask[0].tolist() == [False, False]
    # Not for the graph: padding past DECODE_PADDING keys per real one, or a sequence of two new tokens.
    assert paged.decode_inputs(_decode_step([3, 40])[0]) is not None      # 80 padded keys for 43 real ones
    assert paged.decode_inputs(_decode_step([3, 3, 3, 40])[0]) is None    # 160 for 49
    two = _decode_step([5, 6])[0]
    two._plan["seqlens"] = [2, 1]
    assert paged.decode_inputs(two) is None


def test_decode_inputs_for_several_new_tokens_per_sequence():
    from varlen.model.attention import paged
    batch, *_ = _decode_step([7, 9], queries=3)
    assert paged.decode_inputs(batch) is None                               # decoding only: one new token
    slots, mask = paged.decode_inputs(batch, max_query=4)
    cs = batch.context_slots
    assert slots.shape == (2, 6) and slots[1].tolist() == cs[7:13].tolist()  # the cached 6 of 9 (3 are new)
    assert mask.tolist() == [[True] * 4 + [False] * 2, [True] * 6]
    assert paged.decode_inputs(_decode_step([3], queries=3)[0], max_query=3)[1].tolist() == [[False, False]]
    uneven = _decode_step([7, 9], queries=3)[0]
    uneven._plan["seqlens"] = [3, 2]
    assert paged.decode_inputs(uneven, max_query=4) is None


def test_in_graph_decode_attention_equals_paged_attention():
    # The compiled decode step's attention, run eagerly here, against the eager engine's paged attention.
    for ctxs in ([9, 6, 7, 12], [1, 2]):  # the second: a one-token prompt's first step beside a decode
        _check_decode_attention(*_decode_step(ctxs))
    for ctxs in ([9, 6, 7, 12], [4], [4, 30]):  # verifying 3 drafts; 4: a 4-token prompt's prefill
        _check_decode_attention(*_decode_step(ctxs, queries=4), queries=4)


def _check_decode_attention(batch, q, k, v, queries=1):
    from varlen.model.attention import paged
    slots, mask = paged.decode_inputs(batch, max_query=queries)
    causal = torch.ones(queries, queries, dtype=torch.bool).tril()
    for layer in range(2):
        graph = compiled.DecodeGraphBatch(batch.positions, slots, mask, causal, batch.k_cache, batch.v_cache)
        got = graph.attend(q, k, v, graph.layer_view(layer))
        assert graph.new_k[0] is k and graph.new_v[0] is v                  # handed out for the runner to write
        want = paged.attention(q, k, v, batch.layer_view(layer))          # writes k, v into the cache
        assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("k", [0, 3])
@pytest.mark.parametrize("c, seqs", [(None, 16), (1, 16), (3, 5), (8, 16), (16, 8)])
def test_warmup_meets_every_graph_class(c, seqs, k):
    # A model of the runner's choice of graph (paged.decode_inputs) and of what each graph specialises or
    # branches on: counts of 1, the new tokens per sequence, and int8's switch at c rows.
    from varlen.serve.engine import warmup_prompts
    batches = warmup_prompts(c, seqs, k)
    within = (lambda n: c is not None and n <= c)

    def graph(seqlens, rows):
        q = seqlens[0]
        if q <= 1 + k and all(n == q for n in seqlens):  # every row computed: B * q of them
            return ("decode", len(seqlens) == 1, q, within(len(seqlens) * q))
        tokens = sum(seqlens)
        return ("general", tokens == 1, rows == 1, within(tokens), within(rows))
    met = set()
    for batch in batches:
        met.add(graph([len(p) for p in batch], len(batch)))  # the prefill
        met.add(graph([1] * len(batch), len(batch)))         # a decode step
    prompts = [p for batch in batches for p in batch]
    assert len({p[0] for p in prompts}) == len(prompts)  # no prompt can hit another's prefix cache
    for b in range(1, seqs + 1):
        for q in range(1, k + 2):
            assert graph([q] * b, b) in met, (b, q)
    for tokens in range(2, 40):
        for rows in range(1, min(tokens, seqs) + 1):
            # A general step of one sequence has more than 1 + k tokens; of 2-3 sequences one token each, never
            # (their padding is always within paged.DECODE_PADDING): those are decode-graph steps.
            if (rows == 1 and tokens <= k + 1) or (tokens == rows <= 3):
                continue
            assert ("general", False, rows == 1, within(tokens), within(rows)) in met, (tokens, rows)
