"""Hugging Face Llama checkpoints, both ways: the one place that maps names, configs and tensors.

varlen's parameter names are LlamaForCausalLM's without the `model.` prefix, and both use rotate-half RoPE,
so weights cross unchanged; only the config needs translating. Weights are read from safetensors only:
a pickle (`.bin`) checkpoint is refused, never loaded.

MTP heads are not part of Llama: an export writes them to mtp_heads.safetensors (varlen's key names) and
their count and kind to config.json as `varlen_mtp_heads` and `varlen_mtp_head`, which transformers keeps
as unused attributes; so transformers loads the base model alone, and importing the directory back restores the heads.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Config, ModelConfig
from ..data.tokenizer import TOKENIZER_FILE, TOKENIZER_FRAMING, TextTokenizer
from ..model.transformer import Transformer
from .io import (CONFIG, MTP_WEIGHTS, WEIGHTS, CheckpointError, read_heads, split_heads, write_heads,
                 write_model_files, write_new_dir)

INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Buffers that some exports saved next to the weights; they are recomputed, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
ROPE_TYPES = ("default", "llama3")
MTP_HEADS_KEY = "varlen_mtp_heads"  # config.json: the head count of mtp_heads.safetensors
MTP_HEAD_KEY = "varlen_mtp_head"    # and their kind (ModelConfig.mtp_head); absent = "block"


def hf_name(name: str) -> str:
    """varlen parameter name -> LlamaForCausalLM state-dict name."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory: its config.json describes an architecture, not a varlen run."""
    config = Path(path) / CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and ("model_type" in data or "architectures" in data)


# ------------------------------------------------------------------------------------------------ configs

def _rope_from_hf(hf: dict, source: Path) -> dict:
    """rope_theta and scaling from either layout: transformers 4 (`rope_theta` + `rope_scaling`) or 5
    (`rope_parameters`)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise CheckpointError(f"{source}: rope_parameters per layer type are not supported; varlen uses one RoPE "
                              f"for every layer")
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported; varlen implements "
                              f"{' and '.join(ROPE_TYPES)} RoPE")
    out = {"rope_theta": float(hf.get("rope_theta") or params.get("rope_theta") or 10000.0)}
    if kind == "llama3":
        try:
            out.update(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                       rope_low_freq_factor=float(scaling["low_freq_factor"]),
                       rope_high_freq_factor=float(scaling["high_freq_factor"]),
                       rope_original_max_len=int(scaling.get("original_max_position_embeddings")
                                                 or hf["max_position_embeddings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: llama3 rope_scaling lacks or mangles field {e}; it needs factor, "
                                  f"low_freq_factor, high_freq_factor, original_max_position_embeddings") from None
    return out


def config_from_hf(hf: dict, source: Path) -> ModelConfig:
    """LlamaConfig fields -> ModelConfig, refusing what the varlen model cannot run exactly."""
    kind = hf.get("model_type")
    if kind != "llama":
        arch = ", ".join(hf.get("architectures") or []) or "unknown"
        raise CheckpointError(f"{source}: model_type is {kind!r} (architectures: {arch}); varlen imports "
                              f"Llama-architecture checkpoints only (model_type 'llama')")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if k not in hf]
    if missing:
        raise CheckpointError(f"{source}: field {missing[0]} is missing; a LlamaConfig needs {', '.join(need)}")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise CheckpointError(f"{source}: {key} is {hf[key]!r}; varlen's Llama supports only {want!r}")
    n_head = int(hf["num_attention_heads"])
    dim = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or dim // n_head
    if head_dim * n_head != dim:
        raise CheckpointError(f"{source}: head_dim {head_dim} x num_attention_heads {n_head} != hidden_size {dim}; "
                              f"varlen needs head_dim = hidden_size / num_attention_heads")
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]), dim=dim, n_layer=int(hf["num_hidden_layers"]), n_head=n_head,
        n_kv_head=int(hf.get("num_key_value_heads") or n_head), ffn_hidden=int(hf["intermediate_size"]),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=int(hf.get("max_position_embeddings", 2048)), mtp_heads=int(hf.get(MTP_HEADS_KEY, 0)),
        mtp_head=str(hf.get(MTP_HEAD_KEY, "block")),
        **_rope_from_hf(hf, source))


def config_to_hf(cfg: ModelConfig, tokenizer: TextTokenizer) -> dict:
    """A LlamaConfig as config.json, in the layout both transformers 4 and 5 read."""
    scaling = None
    if cfg.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                   "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eod_id, "torch_dtype": "float32", "use_cache": True,
        **({MTP_HEADS_KEY: cfg.mtp_heads, MTP_HEAD_KEY: cfg.mtp_head} if cfg.mtp_heads else {}),
    }


# ------------------------------------------------------------------------------------------------ tensors

def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a HF directory (sharded or not); pickle-only directories are refused."""
    index = directory / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index ({type(e).__name__}: {e}); it needs a "
                                  f"weight_map") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} lists shard {f.name}, which is missing from {directory}")
        return files
    if (directory / WEIGHTS).is_file():
        return [directory / WEIGHTS]
    shards = sorted(p for p in directory.glob("*.safetensors") if p.name != MTP_WEIGHTS)
    if shards:
        return shards
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{directory} holds only pickle weights ({', '.join(pickles[:3])}); varlen never "
                              f"loads pickle files, which can run code. Re-save them as safetensors, e.g. "
                              f"model.save_pretrained(dir, safe_serialization=True) in a trusted environment")
    raise CheckpointError(f"{directory} has no {WEIGHTS} or {INDEX}; pass a Hugging Face model directory")


def _read_tensors(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    tensors, where = {}, {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    tensors[key], where[key] = fh.get_tensor(key), f
        except Exception as e:  # safetensors raises its own type for a damaged header or body
            raise CheckpointError(f"{f} is truncated or corrupted ({type(e).__name__}: {str(e)[:120]})") from None
    return tensors, where


def state_from_hf(tensors: dict[str, torch.Tensor], where: dict[str, Path], cfg: ModelConfig,
                  source: Path) -> dict[str, torch.Tensor]:
    """HF state dict -> varlen state dict (base model, no MTP heads) in float32, checked tensor by tensor
    against `cfg`."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(dataclasses.replace(cfg, mtp_heads=0)).state_dict().items()}
    files = ", ".join(sorted({p.name for p in where.values()})) or "the weight files"
    state = {}
    for name, shape in expected.items():
        key = hf_name(name)
        if key not in tensors:
            raise CheckpointError(f"{source}: tensor {key} is missing from {files}; the checkpoint does not match "
                                  f"its {CONFIG}")
        t = tensors[key]
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{where[key]}: tensor {key} has shape {tuple(t.shape)}, but {CONFIG} implies "
                                  f"{tuple(shape)}; check hidden_size, num_key_value_heads, intermediate_size and "
                                  f"vocab_size")
        if not t.is_floating_point():
            raise CheckpointError(f"{where[key]}: tensor {key} has dtype {t.dtype}; expected floating-point weights")
        state[name] = t.to(torch.float32)
    known = {hf_name(n) for n in expected}
    if cfg.tie_embeddings:
        known.add("lm_head.weight")  # some exports store the tied copy too
    extra = [k for k in tensors if k not in known and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        raise CheckpointError(f"{where[extra[0]]}: unexpected tensor {extra[0]} ({len(extra)} in all); it is not "
                              f"part of a Llama model as {CONFIG} describes it")
    return state


# ------------------------------------------------------------------------------------------------ both ways

def load_hf(directory: str | Path) -> tuple[Transformer, Config, TextTokenizer]:
    """Any Llama-architecture HF directory -> varlen model (float32, eval mode), config and tokenizer.

    The tokenizer frames prompts as transformers does (its post-processor), unless its tokenizer_config.json
    says otherwise: a directory varlen exported keeps the framing its model was trained with."""
    directory = Path(directory)
    source = directory / CONFIG
    try:
        hf = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source} is unreadable ({type(e).__name__}); pass a Hugging Face model "
                              f"directory") from None
    cfg = Config(model=config_from_hf(hf, source))
    if not (directory / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{directory} has no {TOKENIZER_FILE}; varlen needs a fast (tokenizers) tokenizer. "
                              f"Save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
    eos = hf.get("eos_token_id")
    tokenizer = TextTokenizer.load_dir(directory, eos[0] if isinstance(eos, list) else eos, TOKENIZER_FRAMING)
    tensors, where = _read_tensors(_weight_files(directory))
    model = Transformer(cfg.model)
    state = state_from_hf(tensors, where, cfg.model, directory)
    state.update({k: v.to(torch.float32) for k, v in read_heads(model, directory).items()})
    model.load_state_dict(state)
    return model.eval(), cfg, tokenizer


def save_hf(model: Transformer, cfg: Config, tokenizer: TextTokenizer, out: str | Path) -> Path:
    """Write a directory that transformers' AutoModelForCausalLM / AutoTokenizer load as they are."""
    m = cfg.model

    def write(tmp: Path) -> None:
        base, heads = split_heads({k: v.detach().to(torch.float32) for k, v in model.state_dict().items()})
        state = {hf_name(k): v.contiguous().cpu() for k, v in base.items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_heads(tmp, heads)
        (tmp / CONFIG).write_text(json.dumps(config_to_hf(m, tokenizer), indent=2) + "\n")
        (tmp / GENERATION_CONFIG).write_text(json.dumps(
            {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eod_id, "max_length": m.max_seq_len},
            indent=2) + "\n")
        tokenizer.save_dir(tmp, m.max_seq_len)
    return write_new_dir(out, write)


def save_varlen(model: Transformer, cfg: Config, tokenizer: TextTokenizer, out: str | Path) -> Path:
    """A self-describing varlen checkpoint directory (what `varlen sample` and `--init-from` take)."""
    return write_new_dir(out, lambda tmp: write_model_files(tmp, model, cfg, tokenizer))
