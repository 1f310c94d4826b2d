"""What machine and software a benchmark ran on, printed and saved with every result."""
from __future__ import annotations

import datetime
import importlib
import os
import platform

import psutil
import torch

from varlen.precision import cpu_info, cpu_model  # noqa: F401  (cpu_model: re-exported for the benchmarks)


def machine_info(threads: int, packages: tuple[str, ...] = ("transformers",)) -> dict:
    """Date (UTC), CPU and its bf16/int8 matrix-unit flags, memory, torch threads and the versions of torch,
    python and `packages`."""
    cpu = cpu_info()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu.pop("model"),
            "cpu_flags": cpu, "logical_cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "threads": threads, "torch": torch.__version__}
    info.update({p: importlib.import_module(p).__version__ for p in packages})
    info["python"] = platform.python_version()
    return info


def matrix_units(info: dict) -> str:
    """The CPU's bf16/int8 matrix-unit flags from machine_info, for a benchmark's header: they decide what
    bf16 and int8 can gain on it."""
    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["cpu_flags"].items())
