"""Serving engine: paged-cache decoding equals plain recomputation, alone or in a busy batch; blocks come back.

Exactness against recomputation is tested in float32; the invariants that hold in any dtype (batching and
preemption do not change greedy tokens, blocks come back) also run in the dtype `auto` picks on this machine
(bf16 on CPUs with bf16 matrix units), which is what `varlen serve` runs by default."""
import copy

import pytest
import torch

from varlen.config import ModelConfig, ServeConfig
from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import train_tokenizer
from varlen.generate import generate
from varlen.model.transformer import Transformer
from varlen.precision import choose_dtype
from varlen.serve.engine import Engine
from varlen.serve.request import RequestError, SamplingParams

CFG = ModelConfig(vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=256)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:30]], 320)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(CFG).eval()
    with torch.no_grad():  # a sharper random model: greedy paths depend on every logit, ties are unlikely
        m.embed_tokens.weight.mul_(20)
    return m


# An engine casts its model in place, so each dtype has its own copy of the model: a bf16 engine on the
# float32 fixture would leave every later test with bf16-rounded weights.
DTYPES = ["float32", "auto"]


@pytest.fixture(scope="module")
def models(model):
    return {"float32": model, "auto": copy.deepcopy(model)}


def engine(model, tokenizer, **kw):
    kw.setdefault("kv_cache_gib", 0.01)
    kw.setdefault("dtype", "float32")  # compared with generate(), which runs the model as it is (float32)
    return Engine(model, tokenizer, ServeConfig(**kw))


def prompts(n, seed=0, lo=1, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, CFG.vocab_size, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def test_greedy_equals_recomputing_without_a_cache(model, tokenizer):
    eng = engine(model, tokenizer)
    for p in prompts(3, seed=1):
        [[c]] = eng.generate([p], greedy(20))
        assert c.token_ids == generate(model, p, 20, temperature=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("budget", [512, 7])  # 7: prefills run in chunks over several steps
def test_greedy_alone_equals_greedy_in_a_busy_batch(models, tokenizer, budget, dtype):
    model, ps = models[dtype], prompts(12, seed=2)
    alone = [engine(model, tokenizer, dtype=dtype).generate([p], greedy(8 + i))[0][0].token_ids
             for i, p in enumerate(ps)]
    assert [len(a) for a in alone] == [8 + i for i in range(len(ps))]
    eng = engine(model, tokenizer, max_num_batched_tokens=budget, dtype=dtype)
    assert eng.runner.k_cache[0].dtype == choose_dtype(dtype, torch.device("cpu")).dtype  # bf16 here under auto
    ids = [eng.add_request(p, greedy(8 + i)) for i, p in enumerate(ps)]
    out = {r: [] for r in ids}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id] += o.new_token_ids
    assert [out[r] for r in ids] == alone
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


@pytest.mark.parametrize("dtype", DTYPES)
def test_preemption_under_a_tiny_cache_gives_the_same_tokens(models, tokenizer, dtype):
    model, ps = models[dtype], prompts(6, seed=3, lo=20, hi=40)
    want = [engine(model, tokenizer, dtype=dtype).generate([p], greedy(40))[0][0].token_ids for p in ps]
    # 12 blocks of 16 tokens: not enough for six 60-80-token sequences at once, so some get preempted.
    # Bytes: blocks x tokens x (K, V) x layers x kv heads x head_dim x the cache's element size.
    size = choose_dtype(dtype, torch.device("cpu")).dtype.itemsize
    eng = engine(model, tokenizer, kv_cache_gib=12 * 16 * 2 * 2 * 2 * 16 * size / 2 ** 30, max_model_len=128,
                 dtype=dtype)
    assert eng.blocks.num_blocks == 12
    got = eng.generate(ps, greedy(40))
    assert [c.token_ids for [c] in got] == want
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefix_cache_hit_reuses_blocks_and_gives_the_same_output(models, tokenizer, dtype):
    model, shared = models[dtype], prompts(1, seed=4, lo=50, hi=51)[0]
    eng = engine(model, tokenizer, dtype=dtype)
    [[first]] = eng.generate([shared + [5, 6]], greedy(10))
    assert eng.blocks.num_cache_hits == 0
    [[second]] = eng.generate([shared + [5, 6]], greedy(10))
    assert eng.blocks.num_cache_hits == 3  # 52 tokens: blocks 0-2 are full and cached
    assert second.token_ids == first.token_ids
    fresh = engine(model, tokenizer, prefix_caching=False, dtype=dtype)
    [[third]] = fresh.generate([shared + [7]], greedy(10))
    [[fourth]] = eng.generate([shared + [7]], greedy(10))
    assert fourth.token_ids == third.token_ids


@pytest.mark.parametrize("dtype", DTYPES)
def test_seeded_sampling_does_not_depend_on_the_batch(models, tokenizer, dtype):
    model, ps = models[dtype], prompts(5, seed=5)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    alone = [engine(model, tokenizer, dtype=dtype).generate([p], params)[0][0].token_ids for p in ps]
    together = [c.token_ids for [c] in engine(model, tokenizer, dtype=dtype).generate(ps, params)]
    assert together == alone


def test_n_completions_differ_and_logprobs_are_reported(tokenizer):
    torch.manual_seed(1)
    soft = Transformer(CFG).eval()  # an untouched random model: its next-token distribution is broad
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3, logprobs=2, ignore_eos=True)
    [cs] = engine(soft, tokenizer).generate([prompts(1, seed=6)[0]], params)
    assert len(cs) == 3 and len({tuple(c.token_ids) for c in cs}) > 1
    for c in cs:
        assert len(c.logprobs) == 6
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert lp["token_id"] == tok and lp["logprob"] <= 0 and len(lp["top"]) == 2
            assert lp["top"][0][1] >= lp["logprob"]


def test_stop_strings_and_max_tokens(tokenizer):
    torch.manual_seed(1)
    eng = engine(Transformer(CFG).eval(), tokenizer)
    params = dict(max_tokens=30, temperature=1.0, seed=11, ignore_eos=True)
    [[full]] = eng.generate(["def main():"], SamplingParams(**params))
    assert full.finish_reason == "length" and len(full.token_ids) == 30
    text = full.text.replace("\ufffd", "")
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2, f"sampled text too short to pick a stop string from: {full.text!r}"
    [[cut]] = eng.generate(["def main():"], SamplingParams(**params, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)]


def test_streamed_text_adds_up_to_the_final_text(model, tokenizer):
    eng = engine(model, tokenizer)
    rid = eng.add_request("def main():\n", SamplingParams(max_tokens=25, temperature=0.9, seed=1, ignore_eos=True))
    parts, last = [], None
    while eng.has_unfinished():
        for o in eng.step():
            parts.append(o.new_text)
            last = o
    assert last.finished and last.request_id == rid and "".join(parts)
    [[again]] = engine(model, tokenizer).generate(["def main():\n"],
                                                  SamplingParams(max_tokens=25, temperature=0.9, seed=1, ignore_eos=True))
    assert "".join(parts) == again.text


def test_abort_frees_blocks_at_once(model, tokenizer):
    eng = engine(model, tokenizer)
    rid = eng.add_request(prompts(1, seed=9, lo=40, hi=41)[0], greedy(50))
    eng.step()
    assert eng.blocks.num_used_blocks > 0
    eng.abort(rid)
    assert eng.blocks.num_used_blocks == 0 and not eng.has_unfinished()


@pytest.mark.parametrize("kw,field", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"n": 99}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 10_000}, "max_tokens"), ({"logprobs": 50}, "logprobs"),
])
def test_bad_parameters_are_refused_by_name(model, tokenizer, kw, field):
    eng = engine(model, tokenizer)
    with pytest.raises(RequestError, match=field):
        eng.add_request("x = 1", SamplingParams(**kw))
    assert not eng.has_unfinished() and eng.blocks.num_used_blocks == 0


def test_empty_and_overlong_prompts_are_refused(model, tokenizer):
    eng = engine(model, tokenizer)
    with pytest.raises(RequestError, match="empty"):
        eng.add_request("", SamplingParams())
    with pytest.raises(RequestError, match="context"):
        eng.add_request([1] * 300, SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="token ids"):
        eng.add_request([1, 99999], SamplingParams())


def test_cli_generate_writes_one_json_line_per_prompt(tmp_path, model, tokenizer, capsys):
    import json

    from varlen.checkpoint.hf_llama import save_varlen
    from varlen.cli import main as cli_main
    from varlen.config import Config

    ckpt = save_varlen(model, Config(model=CFG), tokenizer, tmp_path / "m")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def f():"}\n\n{"prompt": "import sys"}\n{"prompt": "class A:"}\n')
    assert cli_main(["generate", str(ckpt), "--prompts-file", str(prompts), "--max-tokens", "6", "--no-progress",
                     "--dtype", "float32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["def f():", "import sys", "class A:"]
    [[want]] = engine(model, tokenizer).generate(["import sys"], SamplingParams(max_tokens=6, temperature=0))
    assert rows[1]["text"] == want.text and rows[1]["completion_tokens"] <= 6
    prompts.write_text('{"prompt": "x"}\nnot json\n')
    assert cli_main(["generate", str(ckpt), "--prompts-file", str(prompts), "--no-progress"]) == 2
    assert f"{prompts}:2" in capsys.readouterr().err
