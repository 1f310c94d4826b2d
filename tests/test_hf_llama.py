"""Hugging Face Llama checkpoints both ways: logits parity with transformers, bitwise round trips, bad input."""
import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from varlen.batch import Batch
from varlen.checkpoint import hf_llama, load_model
from varlen.checkpoint.io import CheckpointError
from varlen.cli import main as cli_main
from varlen.config import Config, ModelConfig
from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import train_tokenizer
from varlen.model.transformer import Transformer

from .helpers import TINY, python_corpus

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM, PreTrainedTokenizerFast)

DOC_LENGTHS = [7, 30, 1, 15, 44]
LLAMA3 = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p.read_text(errors="replace") for p in stdlib_files()[:40]]
    return train_tokenizer(texts, 320)


def make_hf(out: Path, tokenizer, *, tie=False, dtype=torch.float32, shard="5GB", **overrides):
    """A random LlamaForCausalLM (GQA, non-default rope_theta) saved as HF saves it, tokenizer included."""
    kw = dict(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0, tie_word_embeddings=tie,
              max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_id,
              eos_token_id=tokenizer.eod_id)
    kw.update(overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():  # HF starts norms at 1; random ones catch a swapped or missing norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(out, max_shard_size=shard)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, eos_token=tokenizer.eod_token,
                            bos_token=tokenizer.eod_token).save_pretrained(out)
    return model.float().eval()


def random_docs(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in DOC_LENGTHS]


def packed_logits(model, docs):
    with torch.no_grad():
        return model(torch.cat(docs), Batch.from_seqlens([len(d) for d in docs]))


def hf_logits_one_by_one(hf, docs):
    with torch.no_grad():
        return torch.cat([hf(input_ids=d[None]).logits[0] for d in docs])


@pytest.mark.parametrize("variant", ["untied", "tied", "llama3_rope"])
def test_imported_model_matches_hf_on_each_document_alone(tmp_path, tokenizer, variant):
    extra = {"tie": variant == "tied"}
    if variant == "llama3_rope":
        extra["rope_parameters"] = LLAMA3
    hf = make_hf(tmp_path / "hf", tokenizer, **extra)
    model, cfg, tok = load_model(tmp_path / "hf")
    assert (cfg.model.n_kv_head, cfg.model.rope_theta, cfg.model.tie_embeddings) == (2, 50000.0, variant == "tied")
    assert cfg.model.rope_scaling == ("llama3" if variant == "llama3_rope" else "none")
    docs = random_docs(cfg.model.vocab_size)
    diff = (packed_logits(model, docs) - hf_logits_one_by_one(hf, docs)).abs().max().item()
    assert diff <= 1e-4
    assert tok.encode("def f(x):\n    return x") == tokenizer.encode("def f(x):\n    return x")


def test_llama3_scaling_changes_the_logits(tmp_path, tokenizer):
    # Otherwise the llama3 parity above could pass with scaling silently ignored.
    plain = make_hf(tmp_path / "plain", tokenizer)
    scaled = make_hf(tmp_path / "scaled", tokenizer, rope_parameters=LLAMA3)
    docs = random_docs(tokenizer.vocab_size)
    assert (hf_logits_one_by_one(plain, docs) - hf_logits_one_by_one(scaled, docs)).abs().max() > 1e-3


def test_sharded_bf16_checkpoint_imports_exactly(tmp_path, tokenizer):
    hf = make_hf(tmp_path / "hf", tokenizer, dtype=torch.bfloat16, shard="60KB")
    assert (tmp_path / "hf" / hf_llama.INDEX).is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1
    model, _, _ = load_model(tmp_path / "hf")
    theirs = hf.state_dict()
    for name, t in model.state_dict().items():
        assert t.dtype == torch.float32
        assert torch.equal(t, theirs[hf_llama.hf_name(name)].to(torch.bfloat16).float())


@pytest.mark.parametrize("tie", [False, True])
def test_exported_model_loads_in_transformers_and_round_trips_bitwise(tmp_path, tokenizer, tie):
    cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=2,
                                   rope_theta=20000.0, tie_embeddings=tie, max_seq_len=128))
    torch.manual_seed(1)
    model = Transformer(cfg.model).eval()
    hf_llama.save_hf(model, cfg, tokenizer, tmp_path / "hf")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert (tmp_path / "hf" / f).is_file()

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    docs = random_docs(tokenizer.vocab_size, seed=3)
    assert (packed_logits(model, docs) - hf_logits_one_by_one(hf, docs)).abs().max().item() <= 1e-4

    text = "import os\n\nclass Foo(Bar):\n    def run(self):  # ünïcode\n        return 42\n"
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
    assert hf_tok.eos_token_id == tokenizer.eod_id

    back, cfg2, tok2 = load_model(tmp_path / "hf")
    assert cfg2.model.ffn_dim == cfg.model.ffn_dim  # imported as an explicit width
    assert dataclasses.replace(cfg2.model, ffn_hidden=0) == cfg.model
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert tok2.encode(text) == tokenizer.encode(text) and tok2.eod_id == tokenizer.eod_id


def test_cli_converts_both_ways_and_samples_from_either_directory(tmp_path, tokenizer, capsys):
    make_hf(tmp_path / "hf", tokenizer)
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "varlen")]) == 0
    assert cli_main(["convert", "--to-hf", str(tmp_path / "varlen"), str(tmp_path / "hf2")]) == 0
    a = load_file(str(tmp_path / "hf" / "model.safetensors"))
    b = load_file(str(tmp_path / "hf2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    outs = []
    for d in ("hf", "varlen"):
        assert cli_main(["sample", str(tmp_path / d), "--prompt", "def ", "--max-new-tokens", "12",
                         "--temperature", "0"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_init_from_hf_trains_a_step_and_saves_a_varlen_checkpoint(tmp_path, tokenizer):
    hf = make_hf(tmp_path / "hf", tokenizer)
    corpus = python_corpus(tmp_path / "corpus", n_files=20)
    run = tmp_path / "run"
    assert cli_main(["train", "--init-from", str(tmp_path / "hf"), "--corpus", str(corpus), "--data.glob", "*.py",
                     "--out", str(run), "--no-progress", *TINY, "--train.max_steps", "1",
                     "--train.eval_every", "0"]) == 0
    ckpt = run / "checkpoints" / "step_0000001"
    model, cfg, tok = load_model(ckpt)
    assert (cfg.model.dim, cfg.model.ffn_dim, cfg.model.rope_theta, cfg.model.tie_embeddings) == (64, 96, 50000.0, False)
    assert cfg.model.max_seq_len == 64  # the run's piece length, not the HF context
    assert tok.encode("x = 1") == tokenizer.encode("x = 1")
    start = hf.state_dict()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, start[hf_llama.hf_name(k)])]
    assert changed, "one optimizer step should move the imported weights"
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["loss"] < 7.0  # ln(320) = 5.77 for a random model; not a fresh init blow-up


# ------------------------------------------------------------------------------------------------ bad input

def edit_config(d: Path, **changes):
    conf = json.loads((d / "config.json").read_text())
    conf.update(changes)
    (d / "config.json").write_text(json.dumps(conf))


@pytest.mark.parametrize("changes,words", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, ["config.json", "model_type", "mistral"]),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, ["config.json", "yarn"]),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, ["config.json", "dynamic"]),
    ({"hidden_act": "gelu"}, ["config.json", "hidden_act"]),
    ({"num_key_value_heads": 4}, ["k_proj", "shape", "num_key_value_heads"]),
])
def test_bad_config_is_refused_naming_file_and_field(tmp_path, tokenizer, changes, words):
    make_hf(tmp_path / "hf", tokenizer)
    edit_config(tmp_path / "hf", **changes)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "hf")
    for w in words:
        assert w in str(e.value)


def test_missing_and_unexpected_tensors_are_named(tmp_path, tokenizer):
    make_hf(tmp_path / "hf", tokenizer)
    f = tmp_path / "hf" / "model.safetensors"
    state = load_file(str(f))
    dropped = state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
        load_model(tmp_path / "hf")
    state["model.layers.1.mlp.up_proj.weight"] = dropped
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors: unexpected tensor .*q_proj\.bias"):
        load_model(tmp_path / "hf")


class _Boom:
    """Unpickling this writes a file: proof that a pickle was executed."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_pickle_checkpoint_is_refused_and_never_loaded(tmp_path, tokenizer):
    make_hf(tmp_path / "hf", tokenizer)
    (tmp_path / "hf" / "model.safetensors").unlink()
    marker = tmp_path / "executed"
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never loads pickle"):
        load_model(tmp_path / "hf")
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_truncated_shard_names_the_file(tmp_path, tokenizer):
    make_hf(tmp_path / "hf", tokenizer, shard="60KB")
    shard = sorted((tmp_path / "hf").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(tmp_path / "hf")


def test_convert_refuses_a_non_hf_source_and_a_used_output(tmp_path, tokenizer, capsys):
    make_hf(tmp_path / "hf", tokenizer)
    assert cli_main(["convert", "--from-hf", str(tmp_path), str(tmp_path / "o")]) == 2
    assert "--from-hf" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert cli_main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "used")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
