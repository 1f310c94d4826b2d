"""Weight-only int8 for serving on a CPU: each Linear's weight as int8 with one scale per output channel.

A decode step multiplies a few rows by every weight, so it is bound by reading the weights: int8 reads a
quarter of fp32's bytes, and PyTorch's own kernel for it (`torch._weight_int8pack_mm`, bf16 activations) runs
a one-row matmul 1.5-2.5x faster than fp32 here. With many rows (prefill chunks, big batches) the matmul is
bound by arithmetic instead and the dense weight wins, bf16 most of all on CPUs with bf16 matrix units. So an
Int8Linear keeps both and picks per call by the number of rows, at a crossover measured once per model.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .packed import PackedLinear, packs


def int8_kernel_available(device: torch.device) -> bool:
    return device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K) int8 and (N,) float32 scales, symmetric per output channel."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    """A bias-free Linear with an int8 copy of its weight for calls of at most `max_int8_rows` rows. The dense
    weight is prepacked for oneDNN when `pack` (eager serving); a compiled forward wants the plain Linear, which
    inductor freezes and packs itself."""

    def __init__(self, linear: nn.Linear, max_int8_rows: int, pack: bool = True):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("Int8Linear takes bias-free Linears (varlen's model has no biases)")
        q, scales = quantize_weight(linear.weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scales", scales.to(torch.bfloat16))
        # The dense weight, for calls with many rows: prepacked for oneDNN where serving packs (see packed.py).
        self.dense = PackedLinear(linear.weight) if pack and packs(linear.weight) else linear
        self.max_int8_rows = max_int8_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] > self.max_int8_rows:
            return self.dense(x)
        # The kernel is fast with bf16 activations only (fp32 ones take a slow generic path).
        out = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.qweight, self.scales)
        return out.to(x.dtype).view(*x.shape[:-1], out.shape[-1])

    def extra_repr(self) -> str:
        n, k = self.qweight.shape
        return f"in_features={k}, out_features={n}, int8 for <= {self.max_int8_rows} rows"


class Int8Output(nn.Module):
    """The (possibly tied) vocab projection as an Int8Linear: Transformer.output_proj."""

    def __init__(self, weight: torch.Tensor, max_int8_rows: int, pack: bool = True):
        super().__init__()
        holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
        holder.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shared with the embedding, no copy
        self.proj = Int8Linear(holder, max_int8_rows, pack)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def int8_rows(model: nn.Module) -> int | None:
    """The row count up to which the model's int8 weights run the int8 kernel, or None if it has none."""
    return next((m.max_int8_rows for m in model.modules() if isinstance(m, Int8Linear)), None)


def int8_crossover(dim: int, hidden: int, dtype: torch.dtype, candidates=(1, 2, 4, 8, 16, 32)) -> int:
    """The most rows for which the int8 kernel beat the dense matmul of `dtype` on a (hidden, dim) weight,
    timed here (well under a second); 0 if it never did."""
    w = torch.randn(hidden, dim) * 0.02
    q, s = quantize_weight(w)
    s = s.to(torch.bfloat16)
    wd = w.to(dtype)
    dense = PackedLinear(wd) if packs(wd) else (lambda x: F.linear(x, wd))  # as serving runs it
    best = 0
    for m in candidates:
        x = torch.randn(m, dim, dtype=dtype)
        xb = x.to(torch.bfloat16)
        t_int8 = _best_time(lambda: torch._weight_int8pack_mm(xb, q, s))
        t_dense = _best_time(lambda: dense(x))
        if t_int8 < t_dense:
            best = m
        else:
            break
    return best


def _best_time(fn, reps: int = 3, inner: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, time.perf_counter() - t)
    return best


def quantize_int8_(model: nn.Module, max_int8_rows: int | None = None, pack: bool = True) -> int:
    """Replace every Linear in the model's blocks (and MTP heads), and the vocab projection, by an Int8Linear,
    in place (`pack`: see Int8Linear). max_int8_rows None measures the crossover on this CPU. Returns the
    crossover used."""
    p = next(model.parameters())
    if not int8_kernel_available(p.device):
        raise RuntimeError(f"int8 weight-only needs PyTorch's CPU kernel torch._weight_int8pack_mm; the model is "
                           f"on {p.device} (torch {torch.__version__}): serve without --quantization int8")
    cfg = model.cfg
    if max_int8_rows is None:
        max_int8_rows = int8_crossover(cfg.dim, cfg.ffn_dim, p.dtype)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child, max_int8_rows, pack))
    model.output_proj = Int8Output(model.output_weight(), max_int8_rows, pack)
    return max_int8_rows
