"""Prompt framing follows the tokenizer: varlen's own frame a prompt as a document ([eod] + ids); a Hugging Face
tokenizer frames it exactly as transformers does, and serving then gives transformers' greedy tokens."""
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from varlen.checkpoint import hf_llama, load_model
from varlen.cli import main as cli_main
from varlen.config import Config, ModelConfig, ServeConfig
from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import (DOCUMENT_FRAMING, EOD, FRAMING_KEY, TOKENIZER_CONFIG, TOKENIZER_FRAMING,
                                   TextTokenizer, train_tokenizer)
from varlen.model.transformer import Transformer
from varlen.serve.engine import LLM
from varlen.serve.request import SamplingParams

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

TEXTS = ["def f(x):\n    return x", " leading space", "x", "ünïcode ok é", "<s> names a special token",
         "a longer line of text, long enough to pass any fixed truncation length a tokenizer.json might carry"]


def corpus() -> list[str]:
    return [p.read_text(errors="replace") for p in stdlib_files()[:30]]


def llama_tokenizer() -> tuple[Tokenizer, dict]:
    """Llama 2's way: SentencePiece-style BPE with byte fallback; tokenizer.json's post-processor adds <s>, and
    tokenizer_config.json says add_bos_token for LlamaTokenizerFast."""
    tok = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    lines = [line for text in corpus() for line in text.splitlines()]  # split=False: a line is one word
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    conf = {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False}
    return tok, conf


def gpt2_tokenizer() -> tuple[Tokenizer, dict]:
    """GPT-2's way: byte-level BPE whose post-processor adds nothing; <|endoftext|> is named both bos and eos
    (the old framing prepended it). add_bos_token is set, but transformers 5 ignores it beside a tokenizer.json;
    so does varlen. The file also carries a truncation and a padding that neither applies by default."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=[EOD], show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.enable_truncation(max_length=8)
    tok.enable_padding(length=16, pad_id=0, pad_token=EOD)
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOD, "eos_token": EOD, "add_bos_token": True}
    return tok, conf


def make_hf_dir(out: Path, tok: Tokenizer, conf: dict) -> Path:
    """A tiny random LlamaForCausalLM with the tokenizer files as a hub download has them."""
    bos, eos = tok.token_to_id(conf["bos_token"]), tok.token_to_id(conf["eos_token"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=bos,
        eos_token_id=eos))
    model.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    (out / TOKENIZER_CONFIG).write_text(json.dumps(conf))
    return out


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_dir(request, tmp_path_factory) -> Path:
    tok, conf = llama_tokenizer() if request.param == "llama" else gpt2_tokenizer()
    return make_hf_dir(tmp_path_factory.mktemp(request.param), tok, conf)


def test_an_imported_tokenizer_frames_prompts_as_transformers_does(hf_dir):
    _, _, tok = load_model(hf_dir)
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    assert tok.framing == TOKENIZER_FRAMING
    for text in TEXTS:
        assert tok.encode_prompt(text) == theirs(text).input_ids, text
        assert tok.encode_prompt(text, add_special_tokens=False) == theirs(text, add_special_tokens=False).input_ids
    first = {tok.encode_prompt(text)[0] for text in TEXTS[:4]}
    if hf_dir.name.startswith("llama"):
        assert first == {tok.bos_id} and tok.bos_id != tok.eod_id
    else:
        assert tok.bos_id not in first, "a GPT-2-style prompt starts with its text, not <|endoftext|>"


def test_serving_an_imported_model_gives_transformers_greedy_tokens(hf_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf.generation_config.eos_token_id = None  # like ignore_eos: 20 tokens, whatever they are
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    llm = LLM(hf_dir, ServeConfig(kv_cache_gib=0.01, max_num_seqs=4, dtype="float32"))  # as transformers runs
    texts = TEXTS[:3]
    outs = llm.generate(texts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for text, [out] in zip(texts, outs):
        enc = theirs(text, return_tensors="pt")
        with torch.no_grad():
            ids = hf.generate(**enc, max_new_tokens=20, do_sample=False, pad_token_id=0)
        assert out.token_ids == ids[0, enc.input_ids.shape[1]:].tolist(), text


def test_cli_sample_frames_an_imported_prompt_as_transformers_does(hf_dir, capsys):
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    theirs = AutoTokenizer.from_pretrained(hf_dir)
    text = TEXTS[0]
    enc = theirs(text, return_tensors="pt")
    with torch.no_grad():  # both stop at the model's eos
        ids = hf.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=0)
    capsys.readouterr()
    assert cli_main(["sample", str(hf_dir), "--prompt", text, "--max-new-tokens", "12", "--temperature", "0",
                     "--dtype", "float32"]) == 0  # as transformers runs
    _, _, tok = load_model(hf_dir)
    assert capsys.readouterr().out == tok.decode(ids[0, enc.input_ids.shape[1]:].tolist()) + "\n"


# ------------------------------------------------------------------------------------- varlen's own tokenizers

@pytest.fixture(scope="module")
def native() -> TextTokenizer:
    return train_tokenizer(corpus(), 320)


def test_a_varlen_tokenizer_frames_a_prompt_as_a_document(native, tmp_path):
    text = "def f(x):\n    return x"
    assert native.framing == DOCUMENT_FRAMING
    assert native.encode_prompt(text) == [native.eod_id] + native.encode(text)
    assert native.encode_prompt(text, add_special_tokens=False) == native.encode(text)
    native.save_dir(tmp_path, 64)
    assert json.loads((tmp_path / TOKENIZER_CONFIG).read_text())[FRAMING_KEY] == DOCUMENT_FRAMING
    assert TextTokenizer.load_dir(tmp_path).encode_prompt(text) == [native.eod_id] + native.encode(text)


def test_older_varlen_directories_keep_document_framing(native, tmp_path):
    """Run dirs written before varlen_framing existed have no key; their loader (not the HF one) is the default."""
    native.save_dir(tmp_path, 64)
    conf = json.loads((tmp_path / TOKENIZER_CONFIG).read_text())
    del conf[FRAMING_KEY]
    (tmp_path / TOKENIZER_CONFIG).write_text(json.dumps(conf))
    assert TextTokenizer.load_dir(tmp_path).framing == DOCUMENT_FRAMING
    assert TextTokenizer.load_dir(tmp_path, framing=TOKENIZER_FRAMING).framing == TOKENIZER_FRAMING


def test_framing_survives_export_and_import(native, tmp_path):
    """A varlen model exported to HF keeps its document framing when imported back; an HF tokenizer re-saved by
    varlen (convert, or a run started from it) keeps its own."""
    cfg = Config(model=ModelConfig(vocab_size=native.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=2,
                                   max_seq_len=64))
    hf_llama.save_hf(Transformer(cfg.model), cfg, native, tmp_path / "export")
    _, _, back = load_model(tmp_path / "export")
    assert back.framing == DOCUMENT_FRAMING and back.encode_prompt("x") == [native.eod_id] + native.encode("x")
    _, _, hf_tok = load_model(make_hf_dir(tmp_path / "hf", *gpt2_tokenizer()))
    (tmp_path / "resaved").mkdir()
    hf_tok.save_dir(tmp_path / "resaved", 64)
    assert TextTokenizer.load_dir(tmp_path / "resaved").framing == TOKENIZER_FRAMING


def test_an_unknown_framing_is_refused_naming_the_file(native, tmp_path):
    native.save_dir(tmp_path, 64)
    conf = json.loads((tmp_path / TOKENIZER_CONFIG).read_text())
    (tmp_path / TOKENIZER_CONFIG).write_text(json.dumps({**conf, FRAMING_KEY: "bos"}))
    with pytest.raises(ValueError, match=rf"{TOKENIZER_CONFIG}: {FRAMING_KEY} is 'bos'; set it to 'document'"):
        TextTokenizer.load_dir(tmp_path)
