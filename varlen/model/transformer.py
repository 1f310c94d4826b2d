"""Llama-style decoder over one packed 1-D token stream (RMSNorm, RoPE, SwiGLU, grouped-query attention).

Weights and RoPE follow Hugging Face's LlamaForCausalLM conventions (rotate-half RoPE, no biases), so
checkpoints map across by name alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch, PagedBatch
from ..config import MTP_HEAD_KINDS, ModelConfig
from .attention import choose_backend, get_attention
from .attention.paged import attention as paged_attention
from .mtp import MTPHeads
from .packed import PackedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as HF does, so bf16 runs and parity tests agree.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.Tensor:
    """(head_dim/2,) inverse frequencies; llama3 scaling stretches the low frequencies as Llama 3.1 does."""
    hd = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    if cfg.rope_scaling != "llama3":
        return inv_freq
    factor, low, high, old_len = (cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                                  cfg.rope_original_max_len)
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (beyond the original context) are slowed by `factor`, short ones kept, and the band
    # between interpolated smoothly: Meta's formula, as transformers' _compute_llama3_parameters has it.
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T,) positions -> cos and sin, each (T, 1, head_dim) float32 (broadcast over heads). sin's first half is
    negated: apply_rope's rotate-half is then one roll, with no negation per call."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, head_dim/2)
    sin = freqs.sin()
    return torch.cat([freqs, freqs], dim=-1).cos()[:, None], torch.cat([-sin, sin], dim=-1)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D): rotate pairs (i, i + D/2), the rotate-half layout of HF Llama: x * cos + rotate_half(x) * sin,
    where rotate_half(x) = (-x[D/2:], x[:D/2]) = roll(x, D/2) with the sign in rope_cos_sin's sin."""
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.dim, bias=False)

    def fuse_(self) -> None:
        """Serving: q, k and v from one matmul (one call, one pass over x). The separate weights stay the
        checkpoint format, so only a model that is not trained or saved again is fused."""
        _fuse(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch, attend) -> torch.Tensor:
        T, H, Hkv, D = x.shape[0], self.n_head, self.n_kv_head, self.head_dim
        if hasattr(self, "qkv_proj"):
            # q and k sit side by side in each row of the fused output: rotate them as one (T, H + Hkv, D) tensor.
            qkv = self.qkv_proj(x)
            q, k = apply_rope(qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D), cos, sin).split([H, Hkv], dim=1)
            v = qkv[:, (H + Hkv) * D:].view(T, Hkv, D)
        else:
            q = apply_rope(self.q_proj(x).view(T, H, D), cos, sin)     # (T, H, D)
            k = apply_rope(self.k_proj(x).view(T, Hkv, D), cos, sin)   # (T, Hkv, D)
            v = self.v_proj(x).view(T, Hkv, D)                         # (T, Hkv, D)
        out = attend(q, k, v, batch)                               # (T, H, D)
        return self.o_proj(out.reshape(T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def fuse_(self) -> None:
        """Serving: gate and up projections from one matmul (see Attention.fuse_)."""
        _fuse(self, ("gate_proj", "up_proj"), "gate_up_proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _fuse(module: nn.Module, names: tuple[str, ...], fused_name: str) -> None:
    """Replace the bias-free Linears `names` of `module` by one Linear `fused_name` whose output is theirs side
    by side. The state dict keeps the separate weights (split on save, joined on load), so a fused model
    still saves and loads as the checkpoint format has it."""
    if hasattr(module, fused_name):
        return
    linears = [getattr(module, n) for n in names]
    sizes = [lin.out_features for lin in linears]
    w = torch.cat([lin.weight.detach() for lin in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    fused.weight = nn.Parameter(w, requires_grad=False)
    for n in names:
        delattr(module, n)
    setattr(module, fused_name, fused)

    def split_on_save(_module, state_dict, prefix, _meta):
        key = f"{prefix}{fused_name}.weight"
        if key in state_dict:
            for n, part in zip(names, state_dict.pop(key).split(sizes)):
                state_dict[f"{prefix}{n}.weight"] = part

    def join_on_load(state_dict, prefix, *_):
        keys = [f"{prefix}{n}.weight" for n in names]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{fused_name}.weight"] = torch.cat([state_dict.pop(k) for k in keys])

    module.register_state_dict_post_hook(split_on_save)
    module._register_load_state_dict_pre_hook(join_on_load)


class Block(nn.Module):
    """attends=False leaves out the attention sub-layer (an "mlp" MTP head): the block then reads only its
    own position, and cos, sin, batch and attend may be None."""

    def __init__(self, cfg: ModelConfig, attends: bool = True):
        super().__init__()
        if attends:
            self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.attends = attends

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                batch: Batch | None = None, attend=None) -> torch.Tensor:
        if self.attends:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp: MTPHeads | None = None
        self.output_proj: nn.Module | None = None  # serving may replace the vocab projection (packed.py, quant.py)
        self.attention_backend = cfg.attention
        # output_proj is derived from the output weight, which the state dict already holds: never saved; a packed
        # one is refilled from that weight on load.
        self.register_state_dict_post_hook(_drop_output_proj)
        self._register_load_state_dict_pre_hook(self._fill_output_proj)
        self.reset_parameters()
        if cfg.mtp_heads:
            # Built and initialised after the trunk, so one seed gives the same trunk with or without heads
            # (runs that differ only in mtp_heads compare like for like).
            if cfg.mtp_head not in MTP_HEAD_KINDS:
                raise ValueError(f"model.mtp_head is {cfg.mtp_head!r}; use one of: {', '.join(MTP_HEAD_KINDS)}")
            attends = cfg.mtp_head == "block"
            self.mtp = MTPHeads([Block(cfg, attends) for _ in range(cfg.mtp_heads)], first_cache_layer=cfg.n_layer)
            self._init(self.mtp.named_parameters(prefix="mtp"))

    def _fill_output_proj(self, state_dict, prefix, *_) -> None:
        if isinstance(self.output_proj, PackedLinear):
            source = "embed_tokens.weight" if self.lm_head is None else "lm_head.weight"
            if prefix + source in state_dict:
                state_dict[prefix + "output_proj.weight"] = state_dict[prefix + source]

    def reset_parameters(self) -> None:
        self._init(self.named_parameters())

    def _init(self, named_parameters) -> None:
        std = 0.02
        for name, p in named_parameters:
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                # GPT-2's scaling: residual branches sum over 2 * n_layer contributions.
                nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states (..., dim) -> logits (..., vocab)."""
        if self.output_proj is not None:
            return self.output_proj(h)
        return F.linear(h, self.output_weight())

    def fuse_projections_(self) -> "Transformer":
        """Serving: fused q/k/v and gate/up matmuls in every block, MTP heads included (see Attention.fuse_)."""
        for module in list(self.modules()):
            if isinstance(module, (Attention, MLP)):
                module.fuse_()
        return self

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def trunk(self, ids: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, tuple]:
        """ids (T,) -> last layer's hidden states (T, dim) before the final norm, and the (cos, sin, attend)
        the MTP heads reuse. A PagedBatch reads and writes its KV cache (layers 0..n_layer-1)."""
        # A batch may bring its own attention and per-layer views (serve/compiled.py's, inside a compiled graph).
        attend = getattr(batch, "attend", None)
        if attend is None:
            paged = isinstance(batch, PagedBatch)
            attend = paged_attention if paged else get_attention(choose_backend(self.attention_backend, ids.device))
        per_layer = hasattr(batch, "layer_view")
        cos, sin = rope_cos_sin(batch.positions, rope_inv_freq(self.cfg, ids.device))
        x = self.embed_tokens(ids)  # (T, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch.layer_view(i) if per_layer else batch, attend)
        return x, (cos, sin, attend)

    def hidden_states(self, ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """ids (T,) -> final normalised hidden states (T, dim). A PagedBatch reads and writes its KV cache."""
        return self.norm(self.trunk(ids, batch)[0])

    def forward(self, ids: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None,
                heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """ids (T,) packed tokens described by `batch` -> logits (T, vocab), or only at `rows` (serving needs
        just each sequence's last position, and the vocab projection is the largest matmul).

        heads=True returns logits_with_heads(...) instead; training asks through forward so that DDP and
        torch.compile wrappers see the call."""
        if heads:
            return self.logits_with_heads(ids, batch, rows)
        h = self.hidden_states(ids, batch)
        return self.project(h if rows is None else h[rows])

    def logits_with_heads(self, ids: torch.Tensor, batch: Batch, rows: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(base logits exactly as forward gives them, [logits of head j predicting token t+1+j, j = 1..k]),
        each (T, vocab) or (len(rows), vocab). The head blocks run on every token, the norm and vocab
        projection only at `rows`."""
        x, (cos, sin, attend) = self.trunk(ids, batch)
        h = self.norm(x)
        base = self.project(h if rows is None else h[rows])
        if self.mtp is None:
            return base, []
        outs = self.mtp(x, cos, sin, batch, attend)  # k x (T, dim), before the shared final norm
        return base, [self.project(self.norm(o if rows is None else o[rows])) for o in outs]

    def logits_and_draft_states(self, ids: torch.Tensor, batch: Batch, rows: torch.Tensor | None, num_heads: int,
                                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Serving with speculative decoding: base logits at `rows` (as forward gives them) and, for each row,
        what draft_logits turns into the first num_heads heads' logits there: (rows, num_heads, dim) head
        outputs for attending heads, which must run on every token to fill their cache layers n_layer + j - 1;
        (rows, 1, dim) trunk states for mlp heads, which run later and only on the row a request drafts from
        (known only after verification). None when num_heads is 0. rows None: every position."""
        x, (cos, sin, attend) = self.trunk(ids, batch)
        at = (lambda t: t) if rows is None else (lambda t: t[rows])
        base = self.project(at(self.norm(x)))
        if not num_heads:
            return base, None
        if not self.mtp.attends:
            return base, at(x)[:, None]
        outs = self.mtp(x, cos, sin, batch, attend, num_heads)
        return base, torch.stack([at(o) for o in outs], dim=1)

    def draft_logits(self, states: torch.Tensor, num_heads: int) -> torch.Tensor:
        """(n, S, dim) rows of logits_and_draft_states' states -> (n, num_heads, vocab), head j at j - 1."""
        if self.mtp.attends:
            outs = states[:, :num_heads]
        else:
            outs = torch.stack(self.mtp(states[:, 0], num_heads=num_heads), dim=1)
        return self.project(self.norm(outs))


def _drop_output_proj(_module, state_dict, prefix, _meta) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "output_proj.")]:
        del state_dict[key]


def flops_per_token(cfg: ModelConfig, seq_len: float) -> float:
    """Forward+backward FLOPs per token: 6 x matmul parameters plus causal attention at length seq_len."""
    d, f, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    per_layer = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2 + 3 * d * f
    # Each MTP head is one more block (or its MLP alone) and one more vocab projection.
    block_heads = cfg.mtp_heads if cfg.mtp_head == "block" else 0
    blocks, outputs = cfg.n_layer + block_heads, 1 + cfg.mtp_heads
    matmul_params = blocks * per_layer + (cfg.mtp_heads - block_heads) * 3 * d * f + outputs * d * cfg.vocab_size
    # QK^T and AV, each 2*H*hd FLOPs per key; a causal token sees (L+1)/2 keys on average.
    attn = blocks * 2 * 2 * cfg.n_head * hd * (seq_len + 1) / 2
    return 6 * matmul_params + 3 * attn
