"""Pictures a user looks at: the loss curve of a run and the length histogram of a corpus."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' not found; pass a run directory made by `varlen train`")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Training loss per step (and validation loss where evaluated) -> RUN_DIR/loss.png."""
    rows = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "loss.png"
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label="train loss")
    val = [r for r in rows if "val_loss" in r]
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    info_path = Path(run_dir) / "data.json"
    if info_path.is_file():
        h = json.loads(info_path.read_text()).get("unigram_entropy")
        if h:
            ax.axhline(h, color="gray", ls="--", lw=1, label=f"unigram entropy {h:.2f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(f"varlen: {Path(run_dir).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_length_histogram(lengths: np.ndarray, out: str | Path, title: str) -> Path:
    """Document lengths on a log axis: long-tailed corpora are unreadable on a linear one."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lengths = np.asarray(lengths)
    bins = np.logspace(0, np.log10(max(int(lengths.max()), 2)), 50)
    ax.hist(lengths, bins=bins)
    ax.set_xscale("log")
    for q, style in ((50, "--"), (90, ":"), (99, "-.")):
        v = np.percentile(lengths, q)
        ax.axvline(v, color="k", ls=style, lw=1, label=f"p{q} = {v:,.0f}")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
