"""What machine and software a benchmark ran on, printed and saved with every result."""
from __future__ import annotations

import datetime
import importlib
import os
import platform
from pathlib import Path

import psutil
import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(threads: int, packages: tuple[str, ...] = ("transformers",)) -> dict:
    """Date (UTC), CPU, memory, torch threads and the versions of torch, python and `packages`."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2 ** 30, 1),
            "threads": threads, "torch": torch.__version__}
    info.update({p: importlib.import_module(p).__version__ for p in packages})
    info["python"] = platform.python_version()
    return info
