"""Which floating-point dtype this device runs fastest: one answer for serving (weights cast to it) and training
(bf16 autocast where it pays, fp32 master weights either way).

`auto` is bf16 on CUDA devices with native bf16, and on CPUs whose flags list bf16 matrix units (amx_bf16,
avx512_bf16) when a short probe confirms a bf16 matmul really runs faster there; fp32 everywhere else. Flags
alone are not enough: a hypervisor can pass a flag through while the work still runs slowly.
"""
from __future__ import annotations

import functools
import logging
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DTYPE_CHOICES, QUANTIZATION_CHOICES, ConfigError

log = logging.getLogger("varlen.precision")

CPUINFO = Path("/proc/cpuinfo")
BF16_MATRIX_FLAGS = ("amx_bf16", "avx512_bf16")   # CPU flags of bf16 matrix units, best first
REPORTED_FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8")
MIN_SPEEDUP = 1.2  # bf16 halves the bytes moved, but rounds every matmul input: below this it is not worth it
# (rows, inner, cols, calls): a prefill-sized and a decode-sized (16 sequences) matmul of a ~1k-wide model. The
# decode one repeats so that a timed sample lasts a millisecond or more, above the timer's noise.
PROBE_SHAPES = ((512, 1024, 1024, 1), (16, 1024, 1024, 4))
PROBE_REPEATS = 5
PROBE_BUDGET = 0.3  # seconds: past it (a busy machine), each shape stops after its first timed repeat


@dataclass(frozen=True)
class PrecisionChoice:
    dtype: torch.dtype
    reason: str  # what was found, e.g. "auto -> bfloat16: CPU has avx512_bf16 and a bf16 matmul ran 2.3x fp32"

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty where there is no such file (macOS, Windows)."""
    try:
        text = path.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_model(path: Path = CPUINFO) -> str:
    try:
        for line in path.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_info() -> dict:
    """{"model": CPU model name, and for each of avx512_bf16, amx_bf16, amx_int8: whether the CPU has it}."""
    flags = cpu_flags()
    return {"model": cpu_model(), **{f: f in flags for f in REPORTED_FLAGS}}


def bf16_matrix_flags() -> list[str]:
    """Which of BF16_MATRIX_FLAGS this CPU lists (none: bf16 matmuls would be emulated, slowly)."""
    flags = cpu_flags()
    return [f for f in BF16_MATRIX_FLAGS if f in flags]


# Cached for the life of the process: the answer depends on the hardware, which does not change under a running
# process (and on the thread count, which a trainer sets before it asks), and every caller (an engine, a trainer,
# a test file making many engines) should get the same answer without probing again; a second probe could also
# answer differently on a busy machine. Not state anyone writes: a pure function's memo.
@functools.cache
def cpu_bf16_speedup() -> float:
    """How many times faster bf16 matmuls run than fp32 ones on this CPU, at its current thread count: the
    smaller ratio over PROBE_SHAPES, each the best of up to PROBE_REPEATS timings after a warm-up: 0.2-0.6 s
    on a 2-core EPYC (more on a busy machine, whose other work can stall a 2-thread matmul for milliseconds)."""
    gen = torch.Generator().manual_seed(0)  # not the global RNG: a trainer's random stream stays untouched
    deadline = time.perf_counter() + PROBE_BUDGET
    ratios = []
    with torch.inference_mode():
        for rows, inner, cols, calls in PROBE_SHAPES:
            a, b = torch.randn(rows, inner, generator=gen), torch.randn(inner, cols, generator=gen)
            pairs = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
            best = {dt: float("inf") for dt in pairs}
            for rep in range(PROBE_REPEATS + 1):  # rep 0 warms up (allocations, kernel selection)
                if rep > 1 and time.perf_counter() > deadline:
                    break
                # Alternating the dtypes spreads a burst of load from other processes over both.
                for dt, (x, y) in pairs.items():
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        x @ y
                    if rep:
                        best[dt] = min(best[dt], time.perf_counter() - t0)
            ratios.append(best[torch.float32] / best[torch.bfloat16])
    return min(ratios)


def choose_dtype(requested: str, device: torch.device) -> PrecisionChoice:
    """The dtype to run in: `requested` ("auto" | "float32" | "bfloat16") resolved for `device`, and why."""
    if requested not in DTYPE_CHOICES:
        raise ConfigError(f"dtype {requested!r} unknown; use one of: {', '.join(DTYPE_CHOICES)}")
    if requested != "auto":
        return PrecisionChoice(getattr(torch, requested), f"{requested} as requested")
    device = torch.device(device)
    fp32, bf16 = torch.float32, torch.bfloat16
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return PrecisionChoice(bf16, "auto -> bfloat16: the CUDA device has native bf16")
        return PrecisionChoice(fp32, "auto -> float32: the CUDA device has no native bf16 (compute capability < 8.0)")
    if device.type != "cpu":
        return PrecisionChoice(fp32, f"auto -> float32: no bf16 probe for {device.type} devices")
    found = bf16_matrix_flags()
    if not found:
        return PrecisionChoice(fp32, f"auto -> float32: CPU has no bf16 matrix units "
                                     f"(no {'/'.join(BF16_MATRIX_FLAGS)})")
    speedup = cpu_bf16_speedup()
    if speedup < MIN_SPEEDUP:
        return PrecisionChoice(fp32, f"auto -> float32: CPU has {found[0]} but a bf16 matmul ran only "
                                     f"{speedup:.2f}x fp32 (bf16 needs {MIN_SPEEDUP}x)")
    return PrecisionChoice(bf16, f"auto -> bfloat16: CPU has {found[0]} and a bf16 matmul ran {speedup:.1f}x fp32")


def prepare_model(model: torch.nn.Module, dtype: str = "auto", quantization: str = "none",
                  pack: bool = True) -> PrecisionChoice:
    """Cast `model` in place to the dtype `choose_dtype` picks for its device, then (quantization "int8")
    quantize its weights, and (pack, bf16 on a CPU with oneDNN) prepack its dense ones; logs and returns the choice.
    Either way the model can serve but no longer train."""
    if quantization not in QUANTIZATION_CHOICES:
        raise ConfigError(f"quantization {quantization!r} unknown; use one of: {', '.join(QUANTIZATION_CHOICES)}")
    choice = choose_dtype(dtype, next(model.parameters()).device)
    model.to(choice.dtype)
    if quantization == "int8":
        try:
            from .model.quant import quantize_int8_
        except ModuleNotFoundError as e:
            if e.name != f"{__package__}.model.quant":
                raise  # quant.py is there but something it needs is not: its own message says what
            raise ConfigError("--quantization int8 needs varlen.model.quant, which this install lacks; "
                              "use --quantization none") from None
        quantize_int8_(model, pack=pack)
        choice = PrecisionChoice(choice.dtype, choice.reason + "; weights quantized to int8")
    elif pack:
        from .model.packed import pack_linears_, packs
        if packs(next(model.parameters())):
            pack_linears_(model)
            choice = PrecisionChoice(choice.dtype, choice.reason + "; weights prepacked for oneDNN")
    log.info("precision: %s", choice.reason)
    return choice
