"""Small corpora and tiny-model options shared by the tests."""
import shutil
import sys
from pathlib import Path

from varlen.data.corpus import stdlib_files

# Small enough that a CPU step takes milliseconds; big enough to exercise GQA and several documents a row.
TINY = ["--model.dim", "64", "--model.n_layer", "2", "--model.n_head", "4", "--model.n_kv_head", "2",
        "--model.vocab_size", "320", "--model.max_seq_len", "64", "--data.tokens_per_step", "512",
        "--data.val_fraction", "0.1", "--train.eval_tokens", "1024", "--train.warmup_steps", "5",
        "--train.threads", "1"]


def python_corpus(dest: Path, n_files: int = 60) -> Path:
    """A directory of real Python sources (small stdlib files), read with --data.glob '*.py'."""
    dest.mkdir(parents=True, exist_ok=True)
    small = [p for p in stdlib_files() if 200 < p.stat().st_size < 6000][:n_files]
    for i, p in enumerate(small):
        shutil.copy(p, dest / f"{i:03d}_{p.name}")
    return dest


def varlen_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "varlen", *args]
