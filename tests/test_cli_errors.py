"""Bad input to the `varlen` command: one line naming the input and the fix, exit code 2, no traceback.

Most cases call `varlen.cli.main` in-process (torch start-up costs ~2 s per subprocess); a few run
`python -m varlen` for real to show the exit code and the absence of a traceback end to end.
"""
import json
import os
import random
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from varlen.cli import main

# A model small enough that a 2-step run takes about a second on CPU.
TINY = ["--model.dim", "32", "--model.n_layer", "1", "--model.n_head", "2", "--model.n_kv_head", "1",
        "--model.vocab_size", "300", "--model.max_seq_len", "32", "--data.tokens_per_step", "64",
        "--train.max_steps", "2", "--train.eval_every", "0"]

# Config-only cases also name a corpus that does not exist: if the config check they exercise ever
# stopped firing, the run ends at the corpus instead of silently training on the stdlib for minutes.
SAFETY_NET = ["--corpus", "/nonexistent/varlen-test-safety-net"]

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu def return class".split()


def make_corpus(root, n=30):
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(n):
        (root / f"d{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))))
    return root


def good_rows(n=30):
    rng = random.Random(1)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))} for _ in range(n)]


def error_line(err, log_prefixes=()):
    """The one `varlen: error:` line of stderr; only progress-log lines with the given prefixes may precede it."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "nothing was printed to stderr"
    *before, last = lines
    for ln in before:
        assert log_prefixes and ln.startswith(log_prefixes), f"unexpected extra stderr line: {ln!r}"
    assert last.startswith("varlen: error: "), last
    return last


def assert_user_error(rc, err, needles, log_prefixes=()):
    assert rc == 2, err
    line = error_line(err, log_prefixes)
    for needle in needles:
        assert needle in line, f"{needle!r} missing from: {line}"
    return line


@pytest.fixture
def run_main(tmp_path, monkeypatch, capsys):
    """varlen.cli.main in-process with a private cache and cwd; returns (returncode, stdout, stderr)."""
    monkeypatch.setenv("VARLEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # the default --out runs/tiny must not land in the repository

    def run(*argv):
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def run_cli(tmp_path, *args, cache=None):
    """The real command in a subprocess."""
    env = {**os.environ, "VARLEN_CACHE": str(cache or tmp_path / "cache")}
    return subprocess.run([sys.executable, "-m", "varlen", *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------- config errors

CONFIG_CASES = [
    # (argv after `train`, substrings the error line must hold)
    (["--train.lr", "-1"], ["train.lr is -1.0", "must be positive"]),
    (["--train.lr=-0.001"], ["train.lr is -0.001", "must be positive"]),
    (["--train.lr", "nan"], ["train.lr is nan"]),
    (["--model.max_seq_len", "1"], ["model.max_seq_len is 1", "at least 2"]),
    (["--model.dim", "256", "--model.n_head", "3"], ["model.n_head (3)", "model.dim (256)", "--model.n_head 8"]),
    (["--model.dim", "96", "--model.n_head", "5"], ["model.n_head (5)", "model.dim (96)", "--model.n_head 8"]),
    (["--model.n_head", "4", "--model.n_kv_head", "3"], ["model.n_kv_head (3)", "model.n_head (4)"]),
    (["--model.vocab_size", "100"], ["model.vocab_size is 100", "260"]),
    (["--data.tokens_per_step", "64"], ["model.max_seq_len (512)", "--data.tokens_per_step"]),
    (["--train.min_lr", "1"], ["train.min_lr (1.0)", "train.lr"]),
    (["--preset", "huge"], ["unknown preset 'huge'", "small, tiny"]),
    (["--model.foo", "1"], ["unknown config field model.foo", "dim", "n_head"]),
    (["--foo.bar", "1"], ["--foo.bar", "--model.dim"]),
    (["--model.dim", "abc"], ["model.dim", "expects int", "'abc'"]),
    (["--model.dim", "1.5"], ["model.dim", "expects int", "'1.5'"]),
    (["--train.lr", "fast"], ["train.lr", "expects float", "'fast'"]),
    (["--train.compile", "maybe"], ["train.compile", "true/false", "'maybe'"]),
    (["--model.dim"], ["--model.dim needs a value"]),
    (["bogus"], ["'bogus'", "--model.dim 128"]),
    (["--config", "/nonexistent/cfg.yaml"], ["/nonexistent/cfg.yaml", "--config"]),
]


@pytest.mark.parametrize("argv, needles", CONFIG_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_config_errors(run_main, argv, needles):
    rc, out, err = run_main("train", *SAFETY_NET, *argv)
    assert_user_error(rc, err, needles)
    assert out == ""


LATE_CASES = [
    pytest.param(["--model.n_head", "0"], ["model.n_head"]),
    pytest.param(["--train.grad_accum", "0"], ["train.grad_accum"]),
    pytest.param(["--model.dim", "1e999"], ["model.dim", "1e999"]),
    pytest.param(["--train.threads", "-1"], ["train.threads"]),
    pytest.param(["--train.lr", "inf"], ["train.lr", "inf"]),
    pytest.param(["--data.batching", "shuffle"], ["data.batching", "concat_chunk"]),
    pytest.param(["--data.batching", "dd", "--data.dd_lo", "5", "--data.dd_hi", "3"], ["data.dd_lo", "dd_hi"]),
    pytest.param(["--data.batching", "dd", "--data.curriculum", "random"], ["data.curriculum", "grow_p2"]),
    pytest.param(["--data.batching", "dd", "--data.dd_hi", "20"], ["data.dd_hi", "max_seq_len"]),
    pytest.param(["--data.batching", "dd", "--model.max_seq_len", "512", "--data.tokens_per_step", "1000"],
                 ["data.tokens_per_step", "multiple"]),
]


@pytest.mark.parametrize("argv, needles", LATE_CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_config_errors_that_once_crashed(run_main, argv, needles):
    rc, out, err = run_main("train", *SAFETY_NET, *argv)
    assert_user_error(rc, err, needles)


@pytest.mark.parametrize("yaml_text, needles", [
    ("model:\n  dim: big\n", ["model.dim", "expects int", "'big'"]),
    ("model:\n  dim: [1, 2]\n", ["model.dim", "expects int", "[1, 2]"]),
    ("model:\n  foo: 1\n", ["unknown config field model.foo", "dim"]),
    ("modle:\n  dim: 64\n", ["cfg.yaml", "unknown config section 'modle'", "model, data, train"]),
    ("- just a list\n", ["cfg.yaml", "expected a mapping"]),
])
def test_config_file_errors(run_main, tmp_path, yaml_text, needles):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text)
    rc, _, err = run_main("train", *SAFETY_NET, "--config", cfg)
    assert_user_error(rc, err, needles)


def test_invalid_yaml_is_one_line(run_main, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: [\n")
    rc, _, err = run_main("train", *SAFETY_NET, "--config", cfg)
    assert_user_error(rc, err, [str(cfg), "not valid YAML", "line"])


def test_bad_value_in_config_file_names_the_file(run_main, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model:\n  dim: big\n")
    rc, _, err = run_main("train", *SAFETY_NET, "--config", cfg)
    assert_user_error(rc, err, [str(cfg), "model.dim", "'big'"])


def test_negative_lr_subprocess(tmp_path):
    # End to end: argparse must pass "-1" through as the value, and the error exits 2 without a traceback.
    r = run_cli(tmp_path, "train", *SAFETY_NET, "--train.lr", "-1")
    assert_user_error(r.returncode, r.stderr, ["train.lr is -1.0", "positive"])


def test_sample_rejects_bad_options(run_main, tmp_path):
    rc, _, err = run_main("sample", tmp_path, "--temperature", "-1")
    assert_user_error(rc, err, ["--temperature is -1.0"])
    rc, _, err = run_main("sample", tmp_path, "--top-p", "0")
    assert_user_error(rc, err, ["--top-p is 0.0", "(0, 1]"])
    rc, _, err = run_main("sample", tmp_path, "--train.lr", "1")
    assert_user_error(rc, err, ["takes no config fields", "--train.lr"])


# ---------------------------------------------------------------- corpus errors

def test_missing_corpus_subprocess(tmp_path):
    missing = tmp_path / "no-such-corpus"
    r = run_cli(tmp_path, "train", "--corpus", missing)
    assert_user_error(r.returncode, r.stderr, [str(missing), "does not exist", "--corpus"])
    assert r.stdout == ""


def test_missing_corpus_via_config_field(run_main, tmp_path):
    missing = tmp_path / "gone.jsonl"
    rc, _, err = run_main("train", "--data.corpus", missing)
    assert_user_error(rc, err, [str(missing), "--corpus"])


def test_missing_corpus_data_stats(run_main, tmp_path):
    missing = tmp_path / "gone"
    rc, _, err = run_main("data", "stats", missing)
    assert_user_error(rc, err, [str(missing), "does not exist"])


def test_dir_without_matching_files(run_main, tmp_path):
    d = tmp_path / "mds"
    d.mkdir()
    (d / "readme.md").write_text("# hi")
    rc, _, err = run_main("train", "--corpus", d)
    assert_user_error(rc, err, [str(d), "**/*.txt", "--data.glob"])
    # The pattern actually used is the one reported.
    rc, _, err = run_main("train", "--corpus", d, "--data.glob", "*.rst")
    assert_user_error(rc, err, [str(d), "*.rst", "--data.glob"])


def test_unknown_corpus_file_type(run_main, tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    rc, _, err = run_main("train", "--corpus", f)
    assert_user_error(rc, err, [str(f), ".jsonl", ".parquet"])


# The tokenizer is trained while the corpus is read, so these errors follow one progress line.
TRAINING_LOG = ("training a ",)


def test_jsonl_not_json_subprocess(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n{this is not json\n")
    r = run_cli(tmp_path, "train", "--corpus", f, "--model.vocab_size", "300")
    assert_user_error(r.returncode, r.stderr, [f"{f}:2", "not valid JSON", "--data.skip_bad"],
                      log_prefixes=TRAINING_LOG)


def test_jsonl_missing_field(run_main, tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"body": "b"}) + "\n")
    rc, _, err = run_main("train", "--corpus", f, *TINY)
    assert_user_error(rc, err, [f"{f}:2", "no field 'text'", "--data.field"], log_prefixes=TRAINING_LOG)
    # A custom field that no line has: named, with the first line's number.
    rc, _, err = run_main("train", "--corpus", f, *TINY, "--data.field", "content")
    assert_user_error(rc, err, [f"{f}:1", "no field 'content'", "--data.field"], log_prefixes=TRAINING_LOG)


def test_skip_bad_trains_past_bad_lines(run_main, tmp_path):
    f = tmp_path / "c.jsonl"
    rows = good_rows()
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, "{broken")               # line 3
    lines.insert(6, json.dumps({"x": 1}))    # line 7
    f.write_text("\n".join(lines) + "\n")
    rc, _, err = run_main("train", "--corpus", f, "--out", tmp_path / "run", "--no-progress", *TINY,
                          "--data.skip_bad", "true")
    assert rc == 0, err
    assert "Traceback" not in err
    assert f"2 bad lines skipped (first: {f}:3, {f}:7)" in err  # reported, not silent
    assert f"{len(rows)} documents" in err
    assert (tmp_path / "run" / "checkpoints" / "step_0000002" / "model.safetensors").is_file()


def test_parquet_missing_column(run_main, tmp_path):
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "body": ["x", "y"]}), f)
    rc, _, err = run_main("train", "--corpus", f, *TINY)
    assert_user_error(rc, err, [str(f), "no column 'text'", "id, body", "--data.field"],
                      log_prefixes=TRAINING_LOG)


def test_parquet_non_string_column(run_main, tmp_path):
    f = tmp_path / "c.parquet"
    pq.write_table(pa.table({"id": [1, 2], "text": ["x", "y"]}), f)
    rc, _, err = run_main("train", "--corpus", f, *TINY, "--data.field", "id")
    assert_user_error(rc, err, ["'id'", "--data.field"], log_prefixes=TRAINING_LOG)


# ---------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny run with two checkpoints (step 1 and 2), shared read-only; tests corrupt copies of it."""
    root = tmp_path_factory.mktemp("trained")
    corpus = make_corpus(root / "corpus")
    cache = root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VARLEN_CACHE", str(cache))
        rc = main(["train", "--corpus", str(corpus), "--out", str(root / "run"), "--no-progress", *TINY,
                   "--train.ckpt_every", "1", "--train.keep_last", "2", "--data.cache_dir", str(cache)])
    assert rc == 0
    ckpts = sorted(p.name for p in (root / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_0000001", "step_0000002"]
    return root


@pytest.fixture
def run_copy(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "run", run)
    return run


def truncate(path, keep_fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep_fraction)])


def test_truncated_weights_subprocess(run_copy, trained_run, tmp_path):
    newest = run_copy / "checkpoints" / "step_0000002"
    prev = run_copy / "checkpoints" / "step_0000001"
    weights = newest / "model.safetensors"
    truncate(weights)
    cache = trained_run / "cache"  # the run's own cache: the error is not preceded by re-tokenizing
    hint = [str(weights), "truncated or corrupted", str(prev)]

    r = run_cli(tmp_path, "sample", run_copy, "--max-new-tokens", "5", cache=cache)
    assert_user_error(r.returncode, r.stderr, hint)
    assert r.stdout == ""

    metrics_before = (run_copy / "metrics.jsonl").read_text()
    r = run_cli(tmp_path, "train", "--resume", run_copy, "--train.max_steps", "3", "--no-progress", cache=cache)
    assert_user_error(r.returncode, r.stderr, hint)
    assert (run_copy / "metrics.jsonl").read_text() == metrics_before  # the failed resume changed nothing
    assert not (run_copy / "checkpoints" / "step_0000003").exists()

    # Nothing was deleted behind the user's back, and the previous checkpoint still samples.
    assert newest.is_dir() and prev.is_dir()
    r = run_cli(tmp_path, "sample", prev, "--max-new-tokens", "5", "--temperature", "0", cache=cache)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("damage", ["half", "5 bytes", "empty", "garbage"])
def test_damaged_weights_sample(run_main, run_copy, damage):
    weights = run_copy / "checkpoints" / "step_0000002" / "model.safetensors"
    size = weights.stat().st_size
    if damage == "half":
        truncate(weights)
    elif damage == "5 bytes":
        weights.write_bytes(weights.read_bytes()[:5])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.write_bytes(b"\xff" * size)
    rc, out, err = run_main("sample", run_copy, "--max-new-tokens", "3")
    assert_user_error(rc, err, [str(weights), "truncated or corrupted", "step_0000001"])
    assert out == ""


@pytest.mark.parametrize("name", ["train_state.pt", "tokenizer.json", "config.json"])
def test_truncated_checkpoint_file_on_resume(run_main, run_copy, trained_run, monkeypatch, name):
    monkeypatch.setenv("VARLEN_CACHE", str(trained_run / "cache"))
    bad = run_copy / "checkpoints" / "step_0000002" / name
    truncate(bad)
    rc, _, err = run_main("train", "--resume", run_copy, "--train.max_steps", "3", "--no-progress")
    assert_user_error(rc, err, [str(bad), "truncated or corrupted", "step_0000001"])
    assert not (run_copy / "checkpoints" / "step_0000003").exists()


def test_following_the_hint_resumes_from_previous(run_main, run_copy, trained_run, monkeypatch):
    # The error says: delete the damaged checkpoint to resume from the previous one. That must work.
    monkeypatch.setenv("VARLEN_CACHE", str(trained_run / "cache"))
    newest = run_copy / "checkpoints" / "step_0000002"
    truncate(newest / "model.safetensors")
    rc, _, err = run_main("train", "--resume", run_copy, "--train.max_steps", "3", "--no-progress")
    assert rc == 2
    shutil.rmtree(newest)
    rc, _, err = run_main("train", "--resume", run_copy, "--train.max_steps", "3", "--no-progress")
    assert rc == 0, err
    assert "from step_0000001" in err
    assert (run_copy / "checkpoints" / "step_0000003" / "model.safetensors").is_file()


def test_sample_without_checkpoint(run_main, tmp_path):
    missing = tmp_path / "no-run"
    rc, _, err = run_main("sample", missing)
    assert_user_error(rc, err, [str(missing), "does not exist", "varlen train"])
    empty = tmp_path / "empty-run"
    empty.mkdir()
    rc, _, err = run_main("sample", empty)
    assert_user_error(rc, err, [str(empty), "holds no checkpoint", f"--out {empty}"])


def test_train_into_run_with_checkpoints_needs_resume(run_main, run_copy, trained_run):
    rc, _, err = run_main("train", "--corpus", trained_run / "corpus", "--out", run_copy, *TINY)
    assert_user_error(rc, err, [str(run_copy), "already has checkpoints", f"--resume {run_copy}"])
