"""One dtype decision for serving and training: explicit choices, `auto` from CPU flags + a probe, CUDA, and
an engine that serves in bf16."""
import copy
import logging
import sys
import time

import pytest
import torch

from varlen import precision
from varlen.cli import _serve_config, build_parser
from varlen.config import ConfigError, ModelConfig, ServeConfig
from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import train_tokenizer
from varlen.model.transformer import Transformer
from varlen.precision import choose_dtype, prepare_model
from varlen.serve.engine import Engine
from varlen.serve.request import SamplingParams
from varlen.train.dist import DistEnv
from varlen.train.loop import training_precision

CPU = torch.device("cpu")
CFG = ModelConfig(vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=256)


def no_probe():
    raise AssertionError("the probe must not run here")


@pytest.fixture
def cpu_with(monkeypatch):
    """Pretend the CPU lists `flags` and the probe measures `speedup` (None: the probe must not run)."""
    def pretend(flags, speedup=None):
        monkeypatch.setattr(precision, "cpu_flags", lambda path=precision.CPUINFO: frozenset(flags))
        monkeypatch.setattr(precision, "cpu_bf16_speedup", no_probe if speedup is None else lambda: speedup)
    return pretend


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_an_explicit_dtype_is_taken_as_asked_without_probing(cpu_with, name, dtype):
    cpu_with({"avx512_bf16"})
    choice = choose_dtype(name, CPU)
    assert choice.dtype == dtype and choice.name == name and "requested" in choice.reason


def test_an_unknown_dtype_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="auto, float32, bfloat16"):
        choose_dtype("fp16", CPU)


def test_auto_without_bf16_matrix_units_is_float32_and_says_which_flags_are_missing(cpu_with):
    cpu_with({"fpu", "avx2", "avx512f"})
    choice = choose_dtype("auto", CPU)
    assert choice.dtype == torch.float32
    assert "amx_bf16" in choice.reason and "avx512_bf16" in choice.reason and "no bf16 matrix units" in choice.reason


def test_auto_with_the_flag_but_a_slow_bf16_matmul_is_float32(cpu_with):
    cpu_with({"avx512_bf16"}, speedup=0.9)
    choice = choose_dtype("auto", CPU)
    assert choice.dtype == torch.float32 and "avx512_bf16" in choice.reason and "0.90x" in choice.reason


@pytest.mark.parametrize("flags, named", [({"avx512_bf16"}, "avx512_bf16"), ({"avx512_bf16", "amx_bf16"}, "amx_bf16")])
def test_auto_with_the_flag_and_a_fast_bf16_matmul_is_bfloat16(cpu_with, flags, named):
    cpu_with(flags, speedup=2.34)
    choice = choose_dtype("auto", CPU)
    assert choice.dtype == torch.bfloat16
    assert choice.reason == f"auto -> bfloat16: CPU has {named} and a bf16 matmul ran 2.3x fp32"


def test_cpu_flags_come_from_cpuinfo_and_a_missing_file_means_none(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx512_bf16 amx_int8\n\n"
                    "processor\t: 1\nflags\t\t: fpu avx512_bf16 amx_int8\n")
    assert precision.cpu_flags(info) == {"fpu", "avx512_bf16", "amx_int8"}
    assert precision.cpu_model(info) == "Some CPU 9000"
    assert precision.cpu_flags(tmp_path / "absent") == frozenset()
    got = precision.cpu_info()
    assert set(got) == {"model", "avx512_bf16", "amx_bf16", "amx_int8"} and isinstance(got["amx_bf16"], bool)


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_on_cuda_is_bfloat16_where_the_gpu_has_it(cpu_with, monkeypatch, native, dtype):
    cpu_with(set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    choice = choose_dtype("auto", torch.device("cuda", 0))
    assert choice.dtype == dtype and "CUDA" in choice.reason


def test_the_probe_is_quick_here_and_cached():
    if not precision.bf16_matrix_flags():
        pytest.skip("no bf16 matrix units: choose_dtype never probes on this CPU")
    t0 = time.perf_counter()
    ratio = precision.cpu_bf16_speedup.__wrapped__()  # uncached: the real cost
    seconds = time.perf_counter() - t0
    print(f"\nprobe: {precision.cpu_info()}, bf16 {ratio:.2f}x fp32, {seconds:.3f} s", file=sys.stderr)
    assert ratio > 0 and seconds < 2.0  # a sanity bound (~0.3 s on an idle 2-core EPYC), not a speed target
    precision.cpu_bf16_speedup()
    t0 = time.perf_counter()
    precision.cpu_bf16_speedup()
    assert time.perf_counter() - t0 < 0.01


def test_training_resumes_in_the_dtype_it_started_with(cpu_with):
    cpu_with({"avx512_bf16"}, speedup=3.0)
    env = DistEnv()
    assert training_precision("auto", CPU, env, None).dtype == torch.bfloat16
    cpu_with(set())  # a resumed auto run does not ask again: a new answer would break exact resumption
    resumed = training_precision("auto", CPU, env, "bfloat16")
    assert resumed.dtype == torch.bfloat16 and "as the run chose" in resumed.reason
    assert training_precision("float32", CPU, env, "bfloat16").dtype == torch.float32  # an explicit dtype wins


# ------------------------------------------------------------------ serving


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:30]], 320)


@pytest.fixture(scope="module")
def sharp_model():
    torch.manual_seed(0)
    m = Transformer(CFG).eval()
    with torch.no_grad():  # a sharper random model: greedy paths depend on every logit, ties are unlikely
        m.embed_tokens.weight.mul_(20)
    return m


def test_a_bf16_engine_has_bf16_weights_and_cache_gives_fp32_logits_and_mostly_the_fp32_tokens(
        sharp_model, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="varlen"):
        bf16 = Engine(copy.deepcopy(sharp_model), tokenizer, ServeConfig(kv_cache_gib=0.01, dtype="bfloat16"))
    fp32 = Engine(copy.deepcopy(sharp_model), tokenizer, ServeConfig(kv_cache_gib=0.01, dtype="float32"))
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("precision: bfloat16 as requested")
    assert bf16.precision.dtype == torch.bfloat16 and fp32.precision.dtype == torch.float32
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert {bf16.runner.k_cache.dtype, bf16.runner.v_cache.dtype} == {torch.bfloat16}
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, CFG.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 33, 48, 60)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=1)
    got = [c for [c] in bf16.generate(prompts, params)]
    want = [c for [c] in fp32.generate(prompts, params)]
    assert all(lp["logprob"] <= 0 for c in got for lp in c.logprobs)
    same = sum(a == b for x, y in zip(got, want) for a, b in zip(x.token_ids, y.token_ids))
    agreement = same / sum(len(c.token_ids) for c in want)
    print(f"\nbf16 vs fp32 greedy: {agreement:.1%} of {sum(len(c.token_ids) for c in want)} tokens agree",
          file=sys.stderr)
    assert [c.token_ids[:3] for c in got] == [c.token_ids[:3] for c in want]
    assert agreement > 0.8
    assert bf16.blocks.num_free_blocks == bf16.blocks.num_blocks

    bf16.add_request(prompts[0], SamplingParams(max_tokens=2, temperature=0))
    [logits] = bf16.runner.run(bf16.scheduler.schedule().scheduled)  # what step() samples from
    assert logits.base.dtype == torch.float32


def test_int8_without_the_quant_module_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "varlen.model.quant", None)  # as if varlen/model/quant.py were absent
    model = Transformer(CFG)
    with pytest.raises(ConfigError, match="int8 needs varlen.model.quant"):
        prepare_model(model, "float32", "int8")


@pytest.mark.parametrize("kw, words", [({"dtype": "fp16"}, ["--dtype", "'fp16'", "auto, float32, bfloat16"]),
                                       ({"quantization": "int4"}, ["--quantization", "'int4'", "none, int8"])])
def test_serve_config_refuses_unknown_values_naming_the_flag_and_the_choices(kw, words):
    with pytest.raises(ConfigError) as e:
        ServeConfig(**kw)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("argv", [["serve", "run", "--dtype", "fp16"], ["generate", "run", "--prompts-file", "p",
                                  "--quantization", "int4"], ["sample", "run", "--dtype", "half"]])
def test_the_cli_refuses_unknown_dtype_and_quantization(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_the_cli_passes_dtype_and_quantization_to_the_serve_config():
    args = build_parser().parse_args(["serve", "run", "--dtype", "bfloat16", "--quantization", "int8"])
    assert (_serve_config(args).dtype, _serve_config(args).quantization) == ("bfloat16", "int8")
    args = build_parser().parse_args(["generate", "run", "--prompts-file", "p"])
    assert (_serve_config(args).dtype, _serve_config(args).quantization) == ("auto", "none")
    assert build_parser().parse_args(["sample", "run", "--dtype", "float32"]).dtype == "float32"
