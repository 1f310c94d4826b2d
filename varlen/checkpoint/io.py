"""Checkpoints: model.safetensors + config.json + tokenizer.json + train_state.pt, written atomically.

MTP heads, when the model has them, go to their own mtp_heads.safetensors, so model.safetensors always
holds just the base model (what a reader that knows nothing of heads, like transformers, expects).

A run directory holds checkpoints/step_NNNNNNN/; a checkpoint directory describes itself, so `sample`
(and later `serve`) take either a run directory (its newest checkpoint) or one checkpoint directory.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..config import Config, ConfigError
from ..data.tokenizer import TextTokenizer
from ..model.mtp import is_head_key
from ..model.transformer import Transformer

CKPT_DIR = "checkpoints"
WEIGHTS, CONFIG, TOKENIZER, TRAIN_STATE = "model.safetensors", "config.json", "tokenizer.json", "train_state.pt"
MTP_WEIGHTS = "mtp_heads.safetensors"  # keys as in the model's state dict: mtp.blocks.{j-1}.*


class CheckpointError(ValueError):
    """A missing, truncated or corrupted checkpoint; the message names the file."""


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1][1]
    if not path.exists():
        raise CheckpointError(f"'{path}' does not exist; pass a run directory made by `varlen train`")
    raise CheckpointError(f"'{path}' holds no checkpoint ({WEIGHTS} or {CKPT_DIR}/step_*); "
                          f"train with `varlen train --out {path}` first")


def write_model_files(directory: Path, model: torch.nn.Module, cfg: Config, tokenizer: TextTokenizer) -> None:
    """model.safetensors (+ mtp_heads.safetensors) + config.json + tokenizer files: all sampling or serving needs."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    base, heads = split_heads(state)
    save_file(base, str(directory / WEIGHTS), metadata={"format": "pt"})
    write_heads(directory, heads)
    (directory / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    tokenizer.save_dir(directory, cfg.model.max_seq_len)


def split_heads(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base model tensors, MTP head tensors) of a state dict."""
    heads = {k: v for k, v in state.items() if is_head_key(k)}
    return {k: v for k, v in state.items() if k not in heads}, heads


def write_heads(directory: Path, heads: dict[str, torch.Tensor]) -> None:
    """mtp_heads.safetensors, only when there are heads: a model without them writes what it always did."""
    if heads:
        heads = {k: v.detach().contiguous().cpu() for k, v in heads.items()}
        save_file(heads, str(directory / MTP_WEIGHTS), metadata={"format": "pt"})


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, cfg: Config, tokenizer: TextTokenizer,
                    train_state: dict, keep_last: int) -> Path:
    """Write into a temp dir, then rename: a kill mid-write leaves the previous checkpoints intact."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    write_model_files(tmp, model, cfg, tokenizer)
    torch.save(train_state, tmp / TRAIN_STATE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def write_new_dir(out: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a temp dir beside `out`, then rename it to `out`: a failed write leaves nothing half-made."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output directory {out} is not empty; pass a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _unreadable(file: Path, err: Exception, ckpt: Path) -> CheckpointError:
    others = [p for _, p in list_checkpoints(ckpt.parent.parent) if p != ckpt]
    hint = f"; the previous checkpoint {others[-1]} is intact: delete {ckpt} to resume from it" if others else ""
    return CheckpointError(f"checkpoint file {file} is truncated or corrupted ({type(err).__name__}: "
                           f"{str(err)[:120]}){hint}")


def load_config(ckpt: Path) -> Config:
    try:
        return Config.from_dict(json.loads((ckpt / CONFIG).read_text()), str(ckpt / CONFIG))
    except (OSError, json.JSONDecodeError, ConfigError) as e:
        raise _unreadable(ckpt / CONFIG, e, ckpt) from None


def load_tokenizer(ckpt: Path) -> TextTokenizer:
    try:
        return TextTokenizer.load_dir(ckpt)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise _unreadable(ckpt / TOKENIZER, e, ckpt) from None


def _read(file: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own error type for a damaged header or body
        raise _unreadable(file, e, ckpt) from None


def _check_keys(file: Path, have: set[str], want: set[str], ckpt: Path) -> None:
    missing, extra = want - have, have - want
    if missing or extra:
        raise CheckpointError(f"{file} does not match the model in {ckpt / CONFIG}: "
                              f"missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")


def read_heads(model: torch.nn.Module, directory: Path) -> dict[str, torch.Tensor]:
    """The MTP head tensors in `directory`'s mtp_heads.safetensors, checked against the model's heads;
    {} for a model without heads."""
    want = {k for k in model.state_dict() if is_head_key(k)}
    file = directory / MTP_WEIGHTS
    if not want and not file.is_file():
        return {}
    if not file.is_file():
        raise CheckpointError(f"{directory / CONFIG} asks for MTP heads but {file} is missing; restore the file "
                              f"or set the head count to 0 in {CONFIG}")
    heads = _read(file, directory)
    _check_keys(file, set(heads), want, directory)
    return heads


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    file = ckpt / WEIGHTS
    state = _read(file, ckpt)
    _check_keys(file, set(state), {k for k in model.state_dict() if not is_head_key(k)}, ckpt)
    state.update(read_heads(model, ckpt))
    model.load_state_dict(state)


def load_train_state(ckpt: Path) -> dict:
    file = ckpt / TRAIN_STATE
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise _unreadable(file, e, ckpt) from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Config, TextTokenizer]:
    """Model (eval mode), its config and tokenizer from a run or checkpoint directory."""
    ckpt = resolve(path)
    cfg = load_config(ckpt)
    model = Transformer(cfg.model)
    load_weights(model, ckpt)
    return model.to(device).eval(), cfg, load_tokenizer(ckpt)
