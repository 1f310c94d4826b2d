"""The tokenized corpus on disk: all token ids in one memory-mapped file plus document offsets, cached."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .corpus import Corpus, CorpusError
from .tokenizer import TextTokenizer, train_tokenizer

SPLIT_SEED = 20240917  # fixed: the validation documents must not move when the training seed does


def default_cache_dir() -> Path:
    return Path(os.environ.get("VARLEN_CACHE") or Path.home() / ".cache" / "varlen")


@dataclass
class TokenStore:
    """Document i is tokens[offsets[i]:offsets[i+1]], framed as [BOS] + text ids + [EOD] (BOS = EOD for varlen's BPE)."""
    tokens: np.ndarray    # memmap, uint16 when the vocabulary fits, else uint32
    offsets: np.ndarray   # (n_docs + 1,) int64
    path: Path

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @classmethod
    def open(cls, path: str | Path) -> "TokenStore":
        path = Path(path)
        meta = json.loads((path / "meta.json").read_text())
        offsets = np.load(path / "offsets.npy")
        tokens = np.memmap(path / "tokens.bin", dtype=np.dtype(meta["dtype"]), mode="r",
                           shape=(int(offsets[-1]),))
        return cls(tokens, offsets, path)


def split_documents(num_docs: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic train/validation split by whole documents. Returns sorted (train_ids, val_ids)."""
    n_val = int(round(num_docs * val_fraction))
    if val_fraction > 0 and num_docs >= 2:
        n_val = max(1, min(n_val, num_docs - 1))
    perm = np.random.default_rng(SPLIT_SEED).permutation(num_docs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def write_store(docs: Iterable[str], tokenizer: TextTokenizer, path: Path, batch_docs: int = 256) -> TokenStore:
    """Tokenize documents in batches straight to disk; written under a temp name, then renamed."""
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=path.parent))
    offsets = [0]
    bos, eod = tokenizer.bos_id, tokenizer.eod_id
    with open(tmp / "tokens.bin", "wb") as f:
        def flush(batch: list[str]) -> None:
            for ids in tokenizer.encode_batch(batch):
                arr = np.asarray([bos, *ids, eod], dtype=dtype)
                f.write(arr.tobytes())
                offsets.append(offsets[-1] + len(arr))
        batch: list[str] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == batch_docs:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    if len(offsets) == 1:
        shutil.rmtree(tmp)
        raise CorpusError("the corpus has no documents; check --corpus and --data.field")
    np.save(tmp / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    (tmp / "meta.json").write_text(json.dumps({"dtype": np.dtype(dtype).name, "num_docs": len(offsets) - 1}))
    if path.exists():  # another process finished first; theirs is identical
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, path)
    return TokenStore.open(path)


def prepare(corpus: Corpus, vocab_size: int, cache_dir: str | Path | None = None,
            log: Callable[[str], None] = print,
            tokenizer: TextTokenizer | None = None) -> tuple[TextTokenizer, TokenStore]:
    """Train (or reuse) the tokenizer for this corpus and tokenize it (or reuse the cached store).

    Pass `tokenizer` (a resumed run's own) to skip training one.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    fp = corpus.fingerprint()
    tok_path = cache / f"tokenizer-{_key(fp, str(vocab_size))}.json"
    if tokenizer is not None:
        pass
    elif tok_path.is_file():
        tokenizer = TextTokenizer.load(tok_path)
    else:
        log(f"training a {vocab_size}-token byte-level BPE on corpus {corpus.spec} ...")
        tokenizer = train_tokenizer(iter(corpus), vocab_size)
        log(f"corpus: {corpus.counts.summary()}")
        tmp = tok_path.with_suffix(".tmp")
        tokenizer.save(tmp)
        os.replace(tmp, tok_path)
    store_path = cache / f"tokens-{_key(fp, tokenizer.to_json(), f'{tokenizer.bos_id},{tokenizer.eod_id}')}"
    if (store_path / "meta.json").is_file():
        return tokenizer, TokenStore.open(store_path)
    log(f"tokenizing corpus {corpus.spec} -> {store_path} ...")
    store = write_store(iter(corpus), tokenizer, store_path)
    log(f"corpus: {corpus.counts.summary()}; {store.num_tokens:,} tokens")
    return tokenizer, store
