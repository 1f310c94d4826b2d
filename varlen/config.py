"""Run configuration: plain dataclasses, loaded from YAML presets/files plus `--section.field VALUE` overrides."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
# block: attends over its own cache layer, so it runs on every token; mlp: reads only its own position's trunk
# state, so serving runs it only on the row a request drafts from (cheaper drafts, usually lower acceptance).
MTP_HEAD_KINDS = ("block", "mlp")
# auto: bf16 where this device runs it faster (varlen/precision.py decides), else float32.
DTYPE_CHOICES = ("auto", "float32", "bfloat16")
QUANTIZATION_CHOICES = ("none", "int8")  # int8: weight-only, serving only (varlen/model/quant.py)


class ConfigError(ValueError):
    """A bad option: the message names the option and the fix."""


@dataclass
class ModelConfig:
    vocab_size: int = 4096       # BPE vocabulary trained on the corpus; also the embedding size
    dim: int = 256               # residual width
    n_layer: int = 4
    n_head: int = 4              # query heads; head_dim = dim // n_head
    n_kv_head: int = 2           # grouped-query attention: n_head must be a multiple of it
    ffn_hidden: int = 0          # SwiGLU hidden width; 0 = Llama's rule (8/3 * dim, rounded up to 64)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"   # none | llama3 (Llama 3.1's long-context frequency scaling; set on import)
    rope_factor: float = 8.0     # llama3 scaling: the fields of HF's rope_scaling, used only with llama3
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # small models spend a large share of parameters on the embedding
    max_seq_len: int = 512       # longest sequence the model sees; longer documents are cut into pieces
    attention: str = "auto"      # auto | sdpa_docs | flex | flash | reference
    mtp_heads: int = 0           # extra heads, head j predicting token t+1+j (Gloeckle et al. 2024); 0 = off
    mtp_head: str = "block"      # block (a transformer block per head) | mlp (its SwiGLU MLP only, no attention)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return ((8 * self.dim // 3) + 63) // 64 * 64


@dataclass
class DataConfig:
    corpus: str = "stdlib"       # stdlib | DIR | FILE.jsonl | FILE.parquet
    glob: str = "**/*.txt"       # files read from a corpus directory
    field: str = "text"          # JSONL field / Parquet column holding the document text
    skip_bad: bool = False       # skip (and count) JSONL lines that are not JSON or lack the field
    tokens_per_step: int = 4096  # input tokens per optimizer step (split over grad_accum micro-steps)
    row_tokens: int = 4096       # longest packed row (never below max_seq_len); bigger steps accumulate (0 = no cap)
    rank_tokens: int = 0         # tokens one rank holds of a row (its memory); below max_seq_len, longer documents
                                 # train whole across a sequence-parallel group (dist.sp); 0 = no such cap
    batching: str = "pack"       # pack | dd (Dataset Decomposition) | concat_chunk (baseline) | pad
    dd_lo: int = 5               # dd: smallest bucket 2^lo tokens; shorter leftovers dropped (or kept)
    dd_hi: int = 0               # dd: largest bucket 2^hi; 0 = the largest power of two <= max_seq_len
    dd_keep_short: bool = False  # dd: keep leftovers shorter than 2^lo in the smallest bucket
    curriculum: str = "grow_p2"  # dd: uniform | grow_p2 | shortest_first | cyclic
    dd_cycles: int = 1           # dd: grow_p2 repeats its short-to-long sweep this many times per epoch
    balance: str = "cost"        # ranks > 1: cost (length-aware, cost model) | round_robin (the naive split)
    cost_model: str = ""         # ranks > 1: JSON from `varlen bench calibrate`; "" = FLOP counts
    val_fraction: float = 0.02   # share of documents held out for validation, chosen by seed
    cache_dir: str = ""          # tokenizer + token store cache; "" = $VARLEN_CACHE or ~/.cache/varlen
    max_docs: int = 0            # read only the first N documents (0 = all); handy for quick runs


@dataclass
class TrainConfig:
    max_steps: int = 1000
    lr: float = 3e-3
    min_lr: float = 3e-4         # cosine decays to this
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0       # 0 disables clipping
    grad_accum: int = 1          # micro-steps per optimizer step (more if data.row_tokens asks for it)
    eval_every: int = 100        # 0 disables periodic validation
    eval_tokens: int = 32768     # validation tokens per evaluation (the same documents every time)
    ckpt_every: int = 200        # 0 = only at the end
    keep_last: int = 2           # checkpoints kept on disk
    log_every: int = 1
    seed: int = 1337
    device: str = "auto"         # auto | cpu | cuda
    dtype: str = "auto"          # auto (bf16 autocast where it pays: see precision.py) | float32 | bfloat16
    compile: bool = False
    threads: int = 0             # torch CPU threads; 0 = torch's default
    init_from: str = ""          # start from these weights: a varlen run/checkpoint or a HF Llama directory
    max_time: float = 0          # stop after this many seconds of training steps (0 = no limit); equal-time runs
    mtp_weight: float = 0.3      # each MTP head's loss weight; below Gloeckle's 1 so k heads don't swamp next-token loss
    tensorboard: bool = False    # also write TensorBoard event files into the run dir (pip install 'varlen[tensorboard]')
    freeze_trunk: bool = False   # train only the MTP heads (e.g. added to an imported model); the trunk stays as loaded


@dataclass
class ServeConfig:
    block_size: int = 16                # tokens per KV-cache block
    kv_cache_gib: float = 0.5           # memory budget for the paged KV cache
    max_num_seqs: int = 32              # sequences running at once
    max_num_batched_tokens: int = 512   # tokens per forward: decodes first, then prefill chunks
    max_model_len: int = 0              # prompt + output limit; 0 = the model's max_seq_len
    prefix_caching: bool = True         # reuse the cache blocks of identical prompt prefixes
    max_waiting: int = 256              # queued requests before new ones are refused (HTTP 429)
    max_n: int = 8                      # completions per request
    max_stop: int = 4                   # stop strings per request
    max_logprobs: int = 5               # top alternatives per token
    speculative: bool = False           # draft tokens with the model's MTP heads, verify them in the next step
    num_speculative: int = 0            # drafts per step (<= the model's mtp_heads); 0 = one per head
    speculative_max_batch: int = 0      # draft only while at most this many requests run; 0 = always
    adaptive_drafts: bool = True        # per step, draft only as many as the heads' confidence says pay (speculate.py)
    dtype: str = "auto"                 # weights and KV cache: auto (bf16 where it runs faster) | float32 | bfloat16
    quantization: str = "none"          # none | int8 (weight-only)
    compile: bool = False               # torch.compile the forward (inductor): minutes of compiling at start-up
    autotune: bool = True               # with compile: time inductor's GEMM kernels for decode steps (longer start)

    def __post_init__(self):
        # Checked here, not only by the CLI: a bad value would otherwise surface deep in model loading.
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"dtype (--dtype) {self.dtype!r} unknown; use one of: {', '.join(DTYPE_CHOICES)}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ConfigError(f"quantization (--quantization) {self.quantization!r} unknown; use one of: "
                              f"{', '.join(QUANTIZATION_CHOICES)}")


@dataclass
class DistConfig:
    sp: str = "auto"             # sequence parallelism over ranks: auto (planned per step) | off | N (every row split N ways)


SP_MODES = ("auto", "off")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "Config":
        cfg = cls()
        apply_dict(cfg, d, source)
        return cfg


SECTIONS = ("model", "data", "train", "dist")


def _coerce(value: Any, typ: type, name: str) -> Any:
    """Turn a YAML or command-line value into the field's type, or say which option is wrong."""
    if isinstance(value, str) and typ is not str:
        text = value.strip()
        if typ is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"option {name} expects true/false, got {value!r}")
        try:
            return typ(float(text)) if typ is int and "e" in text.lower() else typ(text)
        except (ValueError, OverflowError):
            raise ConfigError(f"option {name} expects {typ.__name__}, got {value!r}") from None
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typ is bool and not isinstance(value, bool):
        raise ConfigError(f"option {name} expects true/false, got {value!r}")
    if not isinstance(value, typ):
        raise ConfigError(f"option {name} expects {typ.__name__}, got {value!r}")
    return value


def _field_types(obj: Any) -> dict[str, type]:
    types = {"int": int, "float": float, "str": str, "bool": bool}
    return {f.name: types[f.type] if isinstance(f.type, str) else f.type for f in fields(obj)}


def set_option(cfg: Config, key: str, value: Any) -> None:
    """Set `section.field` from a string or YAML value."""
    section, _, name = key.partition(".")
    if section not in SECTIONS or not name:
        raise ConfigError(f"unknown option --{key}: options look like --model.dim, --data.corpus, --train.lr, "
                          f"--dist.sp")
    sub = getattr(cfg, section)
    types = _field_types(sub)
    if name not in types:
        known = ", ".join(sorted(types))
        raise ConfigError(f"unknown config field {section}.{name}; {section} has: {known}")
    setattr(sub, name, _coerce(value, types[name], f"{section}.{name}"))


def apply_dict(cfg: Config, d: dict, source: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
    for section, values in d.items():
        if section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section {section!r}; use one of {', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        for name, value in values.items():
            try:
                set_option(cfg, f"{section}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}; fix the file") from None


def load_config(preset: str | None = None, config_file: str | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- preset <- config file <- overrides, then validated."""
    cfg = Config()
    if preset:
        path = CONFIGS_DIR / f"{preset}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(preset_names())}")
        apply_dict(cfg, load_yaml(path), f"preset {preset}")
    if config_file:
        apply_dict(cfg, load_yaml(config_file), str(config_file))
    for key, value in (overrides or {}).items():
        set_option(cfg, key, value)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """The first broken rule, as a ConfigError naming the option and the fix."""
    m, d, t = cfg.model, cfg.data, cfg.train
    for sec in SECTIONS:
        for f in fields(getattr(cfg, sec)):
            value = getattr(getattr(cfg, sec), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"option {sec}.{f.name} is {value}; it must be a finite number")
    checks = [
        (lambda: m.dim > 0, f"model.dim is {m.dim}; it must be positive"),
        (lambda: m.n_head > 0 and m.dim % m.n_head == 0,
         f"model.n_head ({m.n_head}) must divide model.dim ({m.dim}); e.g. --model.n_head {_divisor(m.dim)}"),
        (lambda: m.n_kv_head > 0 and m.n_head % m.n_kv_head == 0,
         f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})"),
        (lambda: m.head_dim % 2 == 0, f"head_dim = dim / n_head = {m.dim // max(m.n_head, 1)} must be even for RoPE"),
        (lambda: m.max_seq_len >= 2, f"model.max_seq_len is {m.max_seq_len}; it must be at least 2"),
        (lambda: m.vocab_size >= 260, f"model.vocab_size is {m.vocab_size}; a byte-level BPE needs at least 260"),
        (lambda: m.n_layer >= 1, f"model.n_layer is {m.n_layer}; it must be at least 1"),
        (lambda: t.threads >= 0, f"train.threads is {t.threads}; use 0 (torch's default) or a positive count"),
        (lambda: d.max_docs >= 0, f"data.max_docs is {d.max_docs}; use 0 (all) or a positive count"),
        (lambda: m.attention in ("auto", "sdpa_docs", "flex", "flash", "reference"),
         f"model.attention {m.attention!r} unknown; use auto, sdpa_docs, flex, flash or reference"),
        (lambda: m.rope_scaling in ("none", "llama3"),
         f"model.rope_scaling {m.rope_scaling!r} unknown; use none or llama3"),
        (lambda: m.rope_scaling == "none" or (m.rope_factor > 0 and m.rope_high_freq_factor > m.rope_low_freq_factor
                                              and m.rope_original_max_len > 0),
         "llama3 rope scaling needs rope_factor > 0, rope_high_freq_factor > rope_low_freq_factor and "
         "rope_original_max_len > 0"),
        (lambda: t.lr > 0, f"train.lr is {t.lr}; the learning rate must be positive"),
        (lambda: 0 <= t.min_lr <= t.lr, f"train.min_lr ({t.min_lr}) must be between 0 and train.lr ({t.lr})"),
        (lambda: t.max_steps >= 1, f"train.max_steps is {t.max_steps}; it must be at least 1"),
        (lambda: t.grad_accum >= 1, f"train.grad_accum is {t.grad_accum}; it must be at least 1"),
        (lambda: t.warmup_steps >= 0 and t.weight_decay >= 0 and t.grad_clip >= 0,
         "train.warmup_steps, train.weight_decay and train.grad_clip must not be negative"),
        (lambda: t.keep_last >= 1, f"train.keep_last is {t.keep_last}; keep at least 1 checkpoint"),
        (lambda: t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"),
         f"train.device {t.device!r} unknown; use auto, cpu or cuda"),
        (lambda: t.dtype in DTYPE_CHOICES, f"train.dtype {t.dtype!r} unknown; use one of: {', '.join(DTYPE_CHOICES)}"),
        (lambda: d.batching in ("pack", "dd", "concat_chunk", "pad"),
         f"data.batching {d.batching!r} unknown; use pack, dd, concat_chunk or pad"),
        (lambda: d.curriculum in ("uniform", "grow_p2", "shortest_first", "cyclic"),
         f"data.curriculum {d.curriculum!r} unknown; use uniform, grow_p2, shortest_first or cyclic"),
        (lambda: 0 <= d.dd_lo and (d.dd_hi == 0 or d.dd_lo <= d.dd_hi),
         f"data.dd_lo ({d.dd_lo}) and data.dd_hi ({d.dd_hi}) need 0 <= dd_lo <= dd_hi; buckets are 2^lo..2^hi"),
        (lambda: d.dd_hi == 0 or 2 ** d.dd_hi <= m.max_seq_len,
         f"data.dd_hi ({d.dd_hi}) makes buckets of {2 ** min(d.dd_hi, 62)} tokens, longer than model.max_seq_len "
         f"({m.max_seq_len}); lower it"),
        (lambda: d.batching != "dd" or d.tokens_per_step % 2 ** (d.dd_hi or m.max_seq_len.bit_length() - 1) == 0,
         f"data.tokens_per_step ({d.tokens_per_step}) must be a multiple of the largest dd bucket "
         f"(2^{d.dd_hi or m.max_seq_len.bit_length() - 1}) so every step holds the same tokens"),
        (lambda: d.balance in ("cost", "round_robin"),
         f"data.balance {d.balance!r} unknown; use cost (length-aware) or round_robin"),
        (lambda: t.max_time >= 0, f"train.max_time is {t.max_time}; use 0 (no limit) or seconds"),
        (lambda: d.dd_cycles >= 1, f"data.dd_cycles is {d.dd_cycles}; it must be at least 1"),
        (lambda: d.row_tokens >= 0, f"data.row_tokens is {d.row_tokens}; use 0 (no cap) or a positive count"),
        (lambda: d.rank_tokens >= 0, f"data.rank_tokens is {d.rank_tokens}; use 0 (no cap) or a positive count"),
        (lambda: cfg.dist.sp in SP_MODES or cfg.dist.sp.isdigit() and int(cfg.dist.sp) >= 1,
         f"dist.sp is {cfg.dist.sp!r}; use auto, off or a sequence-parallel degree such as 2"),
        (lambda: d.batching in ("pack", "dd") or (cfg.dist.sp in SP_MODES and not 0 < d.rank_tokens < m.max_seq_len),
         f"sequence parallelism (data.rank_tokens below model.max_seq_len, or dist.sp {cfg.dist.sp}) splits "
         f"documents, which data.batching {d.batching} does not keep whole; use --data.batching pack or dd"),
        (lambda: cfg.dist.sp != "off" or not 0 < d.rank_tokens < m.max_seq_len,
         f"data.rank_tokens ({d.rank_tokens}) is below model.max_seq_len ({m.max_seq_len}) with dist.sp off: "
         f"documents that long would not fit one rank; pass --dist.sp auto, or raise data.rank_tokens"),
        (lambda: 0 <= d.val_fraction < 1, f"data.val_fraction is {d.val_fraction}; use a value in [0, 1)"),
        (lambda: m.mtp_heads >= 0, f"model.mtp_heads is {m.mtp_heads}; use 0 (off) or a positive head count"),
        (lambda: m.mtp_head in MTP_HEAD_KINDS,
         f"model.mtp_head is {m.mtp_head!r}; use one of: {', '.join(MTP_HEAD_KINDS)}"),
        (lambda: t.mtp_weight > 0 or m.mtp_heads == 0,
         f"train.mtp_weight is {t.mtp_weight}; with model.mtp_heads > 0 it must be positive (e.g. 0.3)"),
        (lambda: not t.freeze_trunk or m.mtp_heads > 0,
         "train.freeze_trunk trains only the MTP heads, but model.mtp_heads is 0; pass --model.mtp_heads 3 "
         "(or drop --train.freeze_trunk)"),
        (lambda: d.tokens_per_step // t.grad_accum >= m.max_seq_len,
         f"data.tokens_per_step / train.grad_accum = {d.tokens_per_step // max(t.grad_accum, 1)} is smaller than "
         f"model.max_seq_len ({m.max_seq_len}); raise --data.tokens_per_step or lower --model.max_seq_len"),
    ]
    for ok, msg in checks:
        if not ok():
            raise ConfigError(msg)


def _divisor(dim: int) -> int:
    for h in (8, 4, 2, 1):
        if dim % h == 0:
            return h
    return 1


def save_json(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_json(path: str | Path) -> Config:
    return Config.from_dict(json.loads(Path(path).read_text()), str(path))
