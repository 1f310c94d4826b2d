"""Corpus readers: each yields documents (str), one per file, JSONL line or Parquet row, in a fixed order."""
from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass, field as dc_field
from pathlib import Path
from typing import Iterator


class CorpusError(ValueError):
    """Unusable corpus input; the message names the input and the fix."""


@dataclass
class CorpusCounts:
    """What a pass over the corpus had to repair or skip; reported to the user, never silent."""
    documents: int = 0
    bad_utf8: int = 0            # documents decoded with U+FFFD replacements
    skipped: int = 0             # JSONL lines skipped under skip_bad
    skipped_where: list[str] = dc_field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.documents} documents"]
        if self.bad_utf8:
            parts.append(f"{self.bad_utf8} with invalid UTF-8 (decoded with replacement characters)")
        if self.skipped:
            parts.append(f"{self.skipped} bad lines skipped (first: {', '.join(self.skipped_where[:3])})")
        return "; ".join(parts)


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every .py file of the running Python's standard library, sorted, without installed packages."""
    root = stdlib_dir()
    return sorted(p for p in root.rglob("*.py")
                  if "site-packages" not in p.relative_to(root).parts and p.is_file())


@dataclass
class Corpus:
    """A corpus spec: `stdlib`, a directory (with a glob), a .jsonl file or a .parquet file."""
    spec: str = "stdlib"
    glob: str = "**/*.txt"
    field: str = "text"
    skip_bad: bool = False
    max_docs: int = 0
    counts: CorpusCounts = dc_field(default_factory=CorpusCounts)

    @property
    def kind(self) -> str:
        if self.spec == "stdlib":
            return "stdlib"
        path = Path(self.spec)
        if not path.exists():
            raise CorpusError(f"corpus path '{self.spec}' does not exist; pass stdlib, a directory, "
                              f"a .jsonl or a .parquet file to --corpus")
        if path.is_dir():
            return "dir"
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            return "jsonl"
        if suffix in (".parquet", ".pq"):
            return "parquet"
        raise CorpusError(f"corpus file '{self.spec}' has an unknown type; use a .jsonl or .parquet file "
                          f"or a directory of text files")

    def files(self) -> list[Path]:
        kind = self.kind
        if kind == "stdlib":
            return stdlib_files()
        if kind == "dir":
            files = sorted(p for p in Path(self.spec).glob(self.glob) if p.is_file())
            if not files:
                raise CorpusError(f"corpus dir '{self.spec}' has no {self.glob} files; "
                                  f"pass --data.glob '**/*.md' (or the pattern your files match)")
            return files
        return [Path(self.spec)]

    def fingerprint(self) -> str:
        """Changes whenever the documents could: spec, options, and each file's size and mtime."""
        h = hashlib.sha256()
        h.update(json.dumps([self.kind, self.spec, self.glob, self.field, self.skip_bad, self.max_docs]).encode())
        for p in self.files():
            st = p.stat()
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def __iter__(self) -> Iterator[str]:
        self.counts = CorpusCounts()
        kind = self.kind
        docs = {"stdlib": self._read_files, "dir": self._read_files,
                "jsonl": self._read_jsonl, "parquet": self._read_parquet}[kind]()
        for doc in docs:
            self.counts.documents += 1
            yield doc
            if self.max_docs and self.counts.documents >= self.max_docs:
                return  # before reading (and judging) one record more than asked for

    def _decode(self, raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.counts.bad_utf8 += 1
            return raw.decode("utf-8", errors="replace")

    def _read_files(self) -> Iterator[str]:
        for p in self.files():
            yield self._decode(p.read_bytes())

    def _bad_line(self, where: str, problem: str) -> None:
        if not self.skip_bad:
            raise CorpusError(f"{where}: {problem}; fix the line or pass --data.skip_bad true to skip bad lines")
        self.counts.skipped += 1
        self.counts.skipped_where.append(where)

    def _read_jsonl(self) -> Iterator[str]:
        path = Path(self.spec)
        with path.open("rb") as f:  # streamed line by line: a JSONL corpus can exceed memory
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(self._decode(raw))
                except json.JSONDecodeError as e:
                    self._bad_line(where, f"not valid JSON ({e.msg})")
                    continue
                if not isinstance(obj, dict) or self.field not in obj:
                    self._bad_line(where, f"no field '{self.field}' (choose the field with --data.field)")
                    continue
                text = obj[self.field]
                if not isinstance(text, str):
                    self._bad_line(where, f"field '{self.field}' is {type(text).__name__}, not a string")
                    continue
                yield text

    def _read_parquet(self) -> Iterator[str]:
        import pyarrow.parquet as pq
        path = Path(self.spec)
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise CorpusError(f"corpus file '{path}' is not a readable Parquet file ({e})") from None
        columns = pf.schema_arrow.names
        if self.field not in columns:
            raise CorpusError(f"parquet file '{path}' has no column '{self.field}'; its columns are: "
                              f"{', '.join(columns)}; choose one with --data.field")
        import pyarrow as pa
        typ = pf.schema_arrow.field(self.field).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_binary(typ)
                or pa.types.is_large_binary(typ)):
            raise CorpusError(f"parquet column '{self.field}' in '{path}' holds {typ}, not text; "
                              f"choose a text column with --data.field")
        for batch in pf.iter_batches(columns=[self.field], batch_size=1024):  # streamed, never whole
            for text in batch.column(0).to_pylist():
                if text is None:
                    self.counts.skipped += 1
                    self.counts.skipped_where.append(f"{path}: null value")
                    continue
                if isinstance(text, bytes):
                    text = self._decode(text)
                yield text
