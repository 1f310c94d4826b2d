"""Corpus readers (stdlib, text dir, JSONL, Parquet), their bad-input errors, and the cached token store."""
import json
import os
import re
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from varlen.data import tokens as tokens_mod
from varlen.data.corpus import Corpus, CorpusError, stdlib_dir, stdlib_files
from varlen.data.tokens import TokenStore, prepare, split_documents


def write_jsonl(path, rows):
    """rows are dicts (dumped as JSON) or raw strings (written as-is, for broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_parquet(path, table, row_group_size=None):
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# ---------------------------------------------------------------- stdlib

def test_stdlib_files_sorted_py_only_without_site_packages():
    files = stdlib_files()
    root = stdlib_dir()
    assert len(files) > 1000
    assert files == sorted(files)  # a fixed order: the same documents every run
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    assert not any("site-packages" in p.relative_to(root).parts for p in files)
    # The exclusion is real: this Python's stdlib dir does contain site-packages with .py files.
    site = root / "site-packages"
    if site.is_dir():
        assert any(site.rglob("*.py"))


def test_stdlib_corpus_iterates_first_files_in_order():
    corpus = Corpus("stdlib", max_docs=5)
    assert corpus.kind == "stdlib"
    docs = list(corpus)
    assert len(docs) == 5
    assert corpus.counts.documents == 5
    expected = [p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_files()[:5]]
    assert docs == expected
    assert list(Corpus("stdlib", max_docs=5)) == docs  # deterministic across passes


# ---------------------------------------------------------------- text directory

@pytest.fixture
def text_dir(tmp_path):
    root = tmp_path / "texts"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("doc b")
    (root / "a.txt").write_text("doc a")
    (root / "sub" / "c.txt").write_text("doc c")
    (root / "sub" / "deeper" / "d.txt").write_text("doc d")
    (root / "notes.md").write_text("markdown e")
    (root / "sub" / "f.md").write_text("markdown f")
    (root / "sub" / "dir.txt").mkdir()  # a directory matching the glob is not a document
    return root


def test_dir_default_glob_reads_nested_txt_sorted(text_dir):
    corpus = Corpus(str(text_dir))
    assert corpus.kind == "dir"
    assert [p.relative_to(text_dir).as_posix() for p in corpus.files()] == [
        "a.txt", "b.txt", "sub/c.txt", "sub/deeper/d.txt"]
    assert list(corpus) == ["doc a", "doc b", "doc c", "doc d"]
    assert corpus.counts.documents == 4


def test_dir_custom_glob(text_dir):
    assert list(Corpus(str(text_dir), glob="**/*.md")) == ["markdown e", "markdown f"]
    assert list(Corpus(str(text_dir), glob="*.md")) == ["markdown e"]  # non-recursive pattern stays shallow


def test_dir_max_docs(text_dir):
    corpus = Corpus(str(text_dir), max_docs=2)
    assert list(corpus) == ["doc a", "doc b"]
    assert corpus.counts.documents == 2


def test_dir_without_matching_files_suggests_glob(tmp_path):
    (tmp_path / "only.md").write_text("x")
    with pytest.raises(CorpusError) as e:
        list(Corpus(str(tmp_path)))
    msg = str(e.value)
    assert str(tmp_path) in msg and "**/*.txt" in msg and "--data.glob" in msg


def test_missing_corpus_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(CorpusError) as e:
        list(Corpus(str(missing)))
    assert str(missing) in str(e.value) and "--corpus" in str(e.value)


def test_unknown_file_type(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    with pytest.raises(CorpusError, match=r"data\.csv.*unknown type.*\.jsonl.*\.parquet"):
        list(Corpus(str(f)))


def test_invalid_utf8_is_replaced_counted_and_reported(tmp_path):
    (tmp_path / "good.txt").write_text("fine")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    corpus = Corpus(str(tmp_path))
    docs = list(corpus)
    assert docs == ["fine", "caf\ufffd au lait"]
    assert corpus.counts.bad_utf8 == 1
    assert corpus.counts.documents == 2
    assert "1 with invalid UTF-8" in corpus.counts.summary()
    # Counts belong to one pass: a second pass starts again from zero, not from 1.
    list(corpus)
    assert corpus.counts.bad_utf8 == 1


def test_summary_of_clean_corpus_mentions_no_repairs(tmp_path):
    (tmp_path / "a.txt").write_text("ok")
    corpus = Corpus(str(tmp_path))
    list(corpus)
    assert corpus.counts.summary() == "1 documents"


# ---------------------------------------------------------------- JSONL

def test_jsonl_default_field_and_blank_lines(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "one", "id": 1}, "", "   ", {"text": "two"}])
    corpus = Corpus(str(f))
    assert corpus.kind == "jsonl"
    assert list(corpus) == ["one", "two"]
    assert corpus.counts.documents == 2


def test_jsonl_custom_field(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"body": "first", "text": "not me"}, {"body": "second"}])
    assert list(Corpus(str(f), field="body")) == ["first", "second"]


def test_jsonl_is_streamed_first_doc_before_a_later_bad_line(tmp_path):
    # If the reader parsed the whole file up front, the bad line 3 would raise before any document.
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "first"}, {"text": "second"}, "{not json"])
    it = iter(Corpus(str(f)))
    assert next(it) == "first"
    assert next(it) == "second"
    with pytest.raises(CorpusError, match=re.escape(f"{f}:3: not valid JSON")):
        next(it)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_jsonl_yields_before_the_file_is_complete(tmp_path):
    # A pipe whose second line is not written yet: a reader that loads the whole file first would block.
    f = tmp_path / "c.jsonl"
    os.mkfifo(f)
    release = threading.Event()

    def writer():
        with open(f, "w") as w:
            w.write(json.dumps({"text": "first"}) + "\n")
            w.flush()
            release.wait(10)
            w.write(json.dumps({"text": "second"}) + "\n")

    threading.Thread(target=writer, daemon=True).start()
    it = iter(Corpus(str(f)))
    got = []
    reader = threading.Thread(target=lambda: got.append(next(it)), daemon=True)
    try:
        reader.start()
        reader.join(10)
        assert got == ["first"]
    finally:
        release.set()
    assert list(it) == ["second"]


def test_jsonl_invalid_json_names_file_and_physical_line(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, "", "[1, 2", {"text": "never"}])
    with pytest.raises(CorpusError) as e:
        list(Corpus(str(f)))
    msg = str(e.value)
    assert f"{f}:3" in msg  # blank lines still count: the number matches an editor's line number
    assert "--data.skip_bad" in msg


@pytest.mark.parametrize("line, problem", [
    ({"body": "x"}, "no field 'text'"),
    ([1, 2, 3], "no field 'text'"),
    ({"text": 5}, "field 'text' is int, not a string"),
    ({"text": None}, "field 'text' is NoneType, not a string"),
])
def test_jsonl_missing_or_non_string_field(tmp_path, line, problem):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "ok"}, line])
    with pytest.raises(CorpusError) as e:
        list(Corpus(str(f)))
    msg = str(e.value)
    assert f"{f}:2" in msg and problem in msg


def test_jsonl_missing_field_hints_data_field(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"content": "x"}])
    with pytest.raises(CorpusError, match="--data.field"):
        list(Corpus(str(f)))


def test_jsonl_skip_bad_counts_and_skips(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [
        {"text": "a"}, "{oops", {"other": "b"}, {"text": "c"}, {"text": 7}, {"text": "d"}])
    corpus = Corpus(str(f), skip_bad=True)
    assert list(corpus) == ["a", "c", "d"]
    assert corpus.counts.documents == 3
    assert corpus.counts.skipped == 3
    assert corpus.counts.skipped_where == [f"{f}:2", f"{f}:3", f"{f}:5"]
    summary = corpus.counts.summary()
    assert "3 bad lines skipped" in summary and f"{f}:2" in summary


def test_jsonl_invalid_utf8_line_is_counted(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "caf\xe9"}\n{"text": "fine"}\n')
    corpus = Corpus(str(f))
    assert list(corpus) == ["caf\ufffd", "fine"]
    assert corpus.counts.bad_utf8 == 1
    assert "invalid UTF-8" in corpus.counts.summary()


def test_max_docs_does_not_read_past_the_limit(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"text": "b"}, "{broken"])
    assert list(Corpus(str(f), max_docs=2)) == ["a", "b"]


# ---------------------------------------------------------------- Parquet

def test_parquet_default_column(tmp_path):
    f = write_parquet(tmp_path / "c.parquet", pa.table({"id": [1, 2, 3], "text": ["x", "y", "z"]}))
    corpus = Corpus(str(f))
    assert corpus.kind == "parquet"
    assert list(corpus) == ["x", "y", "z"]
    assert corpus.counts.documents == 3


def test_parquet_custom_column_via_field(tmp_path):
    f = write_parquet(tmp_path / "c.parquet", pa.table({"text": ["no", "no"], "content": ["p", "q"]}))
    assert list(Corpus(str(f), field="content")) == ["p", "q"]


def test_parquet_binary_column_is_decoded_and_bad_utf8_counted(tmp_path):
    f = write_parquet(tmp_path / "c.parquet", pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary())}))
    corpus = Corpus(str(f))
    assert list(corpus) == ["ok", "caf\ufffd"]
    assert corpus.counts.bad_utf8 == 1


def test_parquet_missing_column_lists_columns(tmp_path):
    f = write_parquet(tmp_path / "c.parquet", pa.table({"id": [1], "body": ["x"]}))
    with pytest.raises(CorpusError) as e:
        list(Corpus(str(f)))
    msg = str(e.value)
    assert str(f) in msg and "'text'" in msg and "id, body" in msg and "--data.field" in msg


def test_parquet_unreadable_file(tmp_path):
    f = tmp_path / "c.parquet"
    f.write_bytes(b"this is not parquet at all")
    with pytest.raises(CorpusError, match="not a readable Parquet file"):
        list(Corpus(str(f)))


def test_parquet_is_streamed_by_batches(tmp_path, monkeypatch):
    n = 3000
    f = write_parquet(tmp_path / "c.parquet", pa.table({"text": [f"doc {i}" for i in range(n)]}),
                      row_group_size=500)
    assert pq.ParquetFile(f).metadata.num_row_groups == 6  # the setup really has several row groups

    pulled = []
    real_iter_batches = pq.ParquetFile.iter_batches

    def spy_iter_batches(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    def forbidden(*args, **kwargs):
        raise AssertionError("the Parquet reader must not load the whole file")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy_iter_batches)
    monkeypatch.setattr(pq.ParquetFile, "read", forbidden)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", forbidden)
    monkeypatch.setattr(pq, "read_table", forbidden)

    it = iter(Corpus(str(f)))
    assert next(it) == "doc 0"
    assert len(pulled) == 1 and pulled[0] < n  # one batch read so far, not the whole table
    rest = list(it)
    assert len(rest) == n - 1 and rest[-1] == f"doc {n - 1}"
    assert sum(pulled) == n


def test_parquet_non_string_column_is_a_corpus_error(tmp_path):
    f = write_parquet(tmp_path / "c.parquet", pa.table({"id": [1, 2], "text": ["a", "b"]}))
    with pytest.raises(CorpusError, match="id"):
        list(Corpus(str(f), field="id"))


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_changes_when_documents_could(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    fp = Corpus(str(tmp_path)).fingerprint()
    assert Corpus(str(tmp_path)).fingerprint() == fp  # stable while nothing changes

    (tmp_path / "a.txt").write_text("alpha, longer now")  # content (and size) change
    fp2 = Corpus(str(tmp_path)).fingerprint()
    assert fp2 != fp

    st = (tmp_path / "b.txt").stat()  # same size, only the mtime moves (an in-place edit)
    os.utime(tmp_path / "b.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fp3 = Corpus(str(tmp_path)).fingerprint()
    assert fp3 != fp2

    (tmp_path / "c.txt").write_text("gamma")  # a new document
    fp4 = Corpus(str(tmp_path)).fingerprint()
    assert fp4 != fp3

    # Options that change which documents are read change it too.
    assert Corpus(str(tmp_path), max_docs=1).fingerprint() != fp4
    assert Corpus(str(tmp_path), glob="*.txt").fingerprint() != fp4


def test_fingerprint_of_jsonl_follows_the_file_and_field(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}])
    fp = Corpus(str(f)).fingerprint()
    assert Corpus(str(f), field="body").fingerprint() != fp
    write_jsonl(f, [{"text": "a"}, {"text": "b"}])
    assert Corpus(str(f)).fingerprint() != fp


# ---------------------------------------------------------------- token store

TEXTS = [
    "def f(x):\n\treturn x  # tab and two spaces\n\n",
    "  leading spaces and trailing  ",
    "naïve café — 日本語 ✓",
    "line one\r\nline two\n",
    "a" * 80,
] + [f"document number {i}: " + "the quick brown fox " * (i % 5 + 1) for i in range(15)]


@pytest.fixture
def small_corpus(tmp_path):
    root = tmp_path / "docs"
    root.mkdir()
    for i, text in enumerate(TEXTS):
        (root / f"{i:03d}.txt").write_bytes(text.encode("utf-8"))  # bytes: keep \r\n as written
    return root


def test_prepare_store_is_uint16_framed_and_round_trips(small_corpus, tmp_path):
    logs = []
    tok, store = prepare(Corpus(str(small_corpus)), 300, tmp_path / "cache", log=logs.append)
    assert tok.vocab_size <= 300
    assert tok.eod_id == 0
    assert store.tokens.dtype == np.uint16
    assert json.loads((store.path / "meta.json").read_text()) == {"dtype": "uint16", "num_docs": len(TEXTS)}
    assert (store.path / "tokens.bin").stat().st_size == 2 * store.num_tokens
    assert store.num_docs == len(TEXTS)
    assert store.offsets[0] == 0 and np.all(np.diff(store.offsets) >= 2)
    for i, text in enumerate(TEXTS):  # documents stay in corpus (sorted file) order
        doc = store.doc(i)
        assert doc[0] == tok.eod_id and doc[-1] == tok.eod_id
        body = [int(t) for t in doc[1:-1]]
        assert tok.eod_id not in body
        assert body == tok.encode(text)
        assert tok.decode(body) == text
    assert any("training a 300-token" in m for m in logs)
    assert any(f"{len(TEXTS)} documents" in m for m in logs)
    # Reopening from disk gives the same ids.
    again = TokenStore.open(store.path)
    assert np.array_equal(np.asarray(again.tokens), np.asarray(store.tokens))


def test_prepare_second_call_reuses_cache(small_corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    tok1, store1 = prepare(Corpus(str(small_corpus)), 300, cache, log=lambda m: None)

    def no_retraining(*a, **k):
        raise AssertionError("the cached tokenizer/store should have been reused")

    monkeypatch.setattr(tokens_mod, "train_tokenizer", no_retraining)
    monkeypatch.setattr(tokens_mod, "write_store", no_retraining)
    logs = []
    tok2, store2 = prepare(Corpus(str(small_corpus)), 300, cache, log=logs.append)
    assert tok2.to_json() == tok1.to_json()
    assert store2.path == store1.path
    assert np.array_equal(np.asarray(store2.tokens), np.asarray(store1.tokens))
    assert logs == []  # nothing was trained or tokenized


def test_prepare_retrains_when_the_corpus_changes(small_corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _, store1 = prepare(Corpus(str(small_corpus)), 300, cache, log=lambda m: None)
    calls = []
    real = tokens_mod.train_tokenizer
    monkeypatch.setattr(tokens_mod, "train_tokenizer", lambda *a, **k: calls.append(1) or real(*a, **k))
    (small_corpus / "new.txt").write_text("a brand new document")
    _, store2 = prepare(Corpus(str(small_corpus)), 300, cache, log=lambda m: None)
    assert calls == [1]
    assert store2.path != store1.path and store2.num_docs == len(TEXTS) + 1


def test_prepare_uses_varlen_cache_env(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("VARLEN_CACHE", str(tmp_path / "envcache"))
    _, store = prepare(Corpus(str(small_corpus)), 300, None, log=lambda m: None)
    assert store.path.parent == tmp_path / "envcache"


def test_prepare_empty_corpus_is_a_corpus_error(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"other": "x"}])
    with pytest.raises(CorpusError, match="no documents"):
        prepare(Corpus(str(f), skip_bad=True), 300, tmp_path / "cache", log=lambda m: None)


@pytest.mark.parametrize("num_docs", [0, 1, 2, 7, 100, 1000])
@pytest.mark.parametrize("val_fraction", [0.0, 0.02, 0.1, 0.5])
def test_split_documents_deterministic_disjoint_complete(num_docs, val_fraction):
    train, val = split_documents(num_docs, val_fraction)
    np.random.seed(num_docs + 1)  # the global numpy seed must not matter
    train2, val2 = split_documents(num_docs, val_fraction)
    assert np.array_equal(train, train2) and np.array_equal(val, val2)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no duplicates
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(num_docs))
    if val_fraction == 0:
        assert len(val) == 0
    elif num_docs >= 2:
        assert 1 <= len(val) <= num_docs - 1  # always something to validate on and to train on
        if num_docs >= 100:
            assert len(val) == round(num_docs * val_fraction)


def test_split_documents_is_a_real_shuffle():
    _, val = split_documents(1000, 0.1)
    assert not np.array_equal(val, np.arange(100))  # not simply the first documents
