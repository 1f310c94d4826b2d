"""A short-document corpus made offline from the stdlib: one document per top-level function or class.

Web text, where Dataset Decomposition shines, is mostly short documents; whole stdlib files are not.
Cutting every stdlib .py file at its top-level `def` / `class` statements (decorators included) gives
documents of a median ~140 tokens from the same text and vocabulary (big classes still reach thousands). Module-level code between
definitions (imports, constants, `if __name__ == ...`) is left out. Files that do not parse as this
Python's syntax (test fixtures, lib2to3 data) are skipped and counted.
"""
from __future__ import annotations

import ast
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from varlen.data.corpus import Corpus, stdlib_files

DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


@dataclass
class ShortDocsInfo:
    path: Path
    files: int          # stdlib .py files read
    skipped_files: int  # files that did not parse
    documents: int


def top_level_defs(source: str) -> list[str]:
    """Source text of each top-level function or class, from its first decorator to its last line."""
    # Lines as the parser counts them (\n, \r\n, \r), unlike str.splitlines, which also splits at \f and \x1c.
    lines = io.StringIO(source, newline="").readlines()
    with warnings.catch_warnings():  # invalid escapes in old stdlib strings: SyntaxWarning on newer Pythons
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    out = []
    for node in tree.body:
        if isinstance(node, DEFS):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            out.append("".join(lines[first - 1:node.end_lineno]))
    return out


def build_short_docs(cache_dir: Path, log=print) -> ShortDocsInfo:
    """Write the corpus as JSONL ({"text": ...} per line) once; reuse it while the stdlib is unchanged."""
    # Named after the stdlib corpus's fingerprint (paths, sizes, mtimes): another Python gets its own file.
    path = cache_dir / f"stdlib-defs-{Corpus('stdlib').fingerprint()}.jsonl"
    meta_path = path.with_suffix(".meta.json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return ShortDocsInfo(path, meta["files"], meta["skipped_files"], meta["documents"])
    files, skipped, n_docs = stdlib_files(), 0, 0
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        for p in files:
            try:
                defs = top_level_defs(p.read_bytes().decode("utf-8", errors="replace"))
            except (SyntaxError, ValueError):  # ValueError: source with NUL bytes
                skipped += 1
                continue
            for text in defs:
                f.write(json.dumps({"text": text}) + "\n")
                n_docs += 1
    os.replace(tmp, path)  # the JSONL appears whole or not at all; its mtime enters the token cache key
    meta_path.write_text(json.dumps({"files": len(files), "skipped_files": skipped, "documents": n_docs}))
    log(f"wrote {n_docs:,} top-level definitions of {len(files) - skipped:,} stdlib files to {path} "
        f"({skipped} files did not parse)")
    return ShortDocsInfo(path, len(files), skipped, n_docs)
