"""Serving with a compiled forward (--compile) gives the eager engine's tokens and log-probabilities, compiles
every graph before the first request, and falls back to eager serving where it cannot compile."""
import copy
import logging

import pytest
import torch

from varlen.config import ModelConfig, ServeConfig
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


def test_compiled_engine_equals_eager_and_compiles_only_at_start(model, tokenizer):
    # Small steps force chunked prefills beside decodes: every kind of step the scheduler makes.
    cfg = dict(kv_cache_gib=0.01, dtype="float32", max_num_batched_tokens=48, max_num_seqs=5)
    eager = Engine(copy.deepcopy(model), tokenizer, ServeConfig(**cfg))
    comp = Engine(copy.deepcopy(model), tokenizer, ServeConfig(**cfg, compile=True))
    assert comp.runner.step_fn is not None and eager.runner.step_fn is None
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 3  # one token; one sequence of several; several sequences
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    batch = prompts(9)
    want = eager.generate(batch, params)
    got = comp.generate(batch, params)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a graph compiled while serving"
    for w, g in zip(want, got):
        assert g[0].token_ids == w[0].token_ids
        assert [e["logprob"] for e in g[0].logprobs] == pytest.approx([e["logprob"] for e in w[0].logprobs],
                                                                         abs=1e-4)
    comp.blocks.check([])  # every block back (the warm-up requests included)


@pytest.mark.parametrize("kw, why", [({"quantization": "int8"}, "int8"),
                                     ({"speculative": True}, "speculative")])
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
