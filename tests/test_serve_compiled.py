"""Serving with a compiled forward (--compile) gives the eager engine's tokens and log-probabilities, compiles
every graph before the first request, and falls back to eager serving where it cannot compile."""
import copy
import logging

import pytest
import torch

from varlen.config import ModelConfig, ServeConfig
from varlen.model.quant import int8_rows
from varlen.model.transformer import Transformer
from varlen.serve import compiled
from varlen.serve.engine import Engine
from varlen.serve.request import SamplingParams

from .test_serve_engine import CFG, model, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.skipif(not compiled.available(), reason="this torch has no opaque objects for custom ops")


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, CFG.vocab_size, (int(torch.randint(1, 90, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("quantization", ["none", "int8"])
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


@pytest.mark.parametrize("kw, why", [({"speculative": True}, "speculative")])
def test_compile_falls_back_to_eager_with_a_reason(model, tokenizer, caplog, kw, why):
    m = copy.deepcopy(model)
    if kw.get("speculative"):
        m = Transformer(ModelConfig(**{**CFG.__dict__, "mtp_heads": 1})).eval()
    with caplog.at_level(logging.WARNING, logger="varlen.serve.engine"):
        eng = Engine(m, tokenizer, ServeConfig(kv_cache_gib=0.01, dtype="float32", compile=True, **kw))
    assert eng.runner.step_fn is None
    assert any("--compile ignored" in r.message and why in r.message for r in caplog.records)
    [[out]] = eng.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert len(out.token_ids) == 3


def _decode_step(ctxs, seed=0, hkv=2, h=6, d=8, layers=2):
    """A decode-only step (one new token per sequence) over a 2-layer cache whose contexts are scattered."""
    from varlen.batch import Batch, PagedBatch
    g = torch.Generator().manual_seed(seed)
    total = sum(ctxs)
    slots = torch.randperm(total + 7, generator=g)[:total]
    k_cache = torch.randn(layers, total + 7, hkv, d, generator=g)
    v_cache = torch.randn(layers, total + 7, hkv, d, generator=g)
    ends = torch.cumsum(torch.tensor(ctxs), 0) - 1
    base = Batch.from_seqlens([1] * len(ctxs))
    batch = PagedBatch(base.cu_seqlens, base.positions, 1, context_lens=list(ctxs), slot_mapping=slots[ends],
                       context_slots=slots, k_cache=k_cache, v_cache=v_cache)
    B = len(ctxs)
    q, k, v = (torch.randn(B, n, d, generator=g) for n in (h, hkv, hkv))
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


def test_in_graph_decode_attention_equals_paged_attention():
    # The compiled decode step's attention, run eagerly here, against the eager engine's paged attention.
    from varlen.model.attention import paged
    for ctxs in ([9, 6, 7, 12], [1, 2]):  # the second: a one-token prompt's first step beside a decode
        _check_decode_attention(*_decode_step(ctxs))


def _check_decode_attention(batch, q, k, v):
    from varlen.model.attention import paged
    slots, mask = paged.decode_inputs(batch)
    for layer in range(2):
        graph = compiled.DecodeGraphBatch(batch.positions, slots, mask, batch.k_cache, batch.v_cache)
        got = graph.attend(q, k, v, graph.layer_view(layer))
        assert graph.new_k[0] is k and graph.new_v[0] is v                  # handed out for the runner to write
        want = paged.attention(q, k, v, batch.layer_view(layer))          # writes k, v into the cache
        assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("c, seqs", [(None, 16), (1, 16), (3, 5), (8, 16), (16, 8)])
def test_warmup_meets_every_graph_class(c, seqs):
    from varlen.serve.engine import warmup_prompts
    batches = warmup_prompts(c, seqs)

    def cls(tokens, rows):  # what a graph specialises or branches on: counts of 1, and int8's row switch
        return (tokens == 1, rows == 1, c is not None and tokens <= c, c is not None and rows <= c)
    met = set()
    for batch in batches:
        met.add(("prefill", cls(sum(map(len, batch)), len(batch))))
        met.add(("decode", cls(len(batch), len(batch))))
    prompts = [p for batch in batches for p in batch]
    assert len({p[0] for p in prompts}) == len(prompts)  # no prompt can hit another's prefix cache
    lim = c or 0
    for tokens in range(1, 40):
        for rows in range(1, min(tokens, seqs) + 1):
            assert ("prefill", cls(tokens, rows)) in met or tokens == 1, (tokens, rows)
            if tokens == rows:
                assert ("decode", cls(tokens, rows)) in met, (tokens, rows, lim)
