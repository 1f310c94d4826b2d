"""Offline batches of any size: generate / generate_iter stream prompts through a bounded window, in input
order, and `varlen generate` writes each row as it is ready."""
import json
import os
import subprocess
import time

import pytest
import torch

from tests.helpers import varlen_cmd
from varlen.checkpoint.hf_llama import save_varlen
from varlen.cli import main
from varlen.config import Config, ModelConfig, ServeConfig
from varlen.model.transformer import Transformer
from varlen.serve.engine import LLM, Engine, PromptError, offline_window
from varlen.serve.request import RequestError, SamplingParams

from .test_serve_engine import tokenizer  # noqa: F401 (fixture)

CFG = ModelConfig(vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards: on a shared machine torch's thread pool costs far more than it saves (20x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(CFG).eval()
    with torch.no_grad():  # a sharper random model: greedy paths depend on every logit, ties are unlikely
        m.embed_tokens.weight.mul_(20)
    return m


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    return save_varlen(model, Config(model=CFG), tokenizer, tmp_path_factory.mktemp("offline") / "tiny")


def engine(model, tokenizer, **kw):
    kw.setdefault("kv_cache_gib", 0.01)
    return Engine(model, tokenizer, ServeConfig(**kw))


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw)


def distinct_prompts(n):
    """n different token-id prompts (i's base-300 digits, shifted past the special ids), the last token differing
    most often: the sharpened random model's next token depends mostly on it."""
    out = []
    for i in range(n):
        digits = [10 + i % 300]
        while i >= 300:
            i //= 300
            digits.insert(0, 10 + i % 300)
        out.append(digits)
    return out


def assert_idle(eng):
    assert not eng.requests and not eng.has_unfinished()
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks


def test_300_prompts_with_a_queue_of_8_come_back_in_order_and_equal_each_prompt_alone(model_dir):
    llm = LLM(model_dir, ServeConfig(max_waiting=8, kv_cache_gib=0.01))
    prompts = distinct_prompts(300)
    out = llm.generate(prompts, greedy(3))
    assert len(out) == 300 and all(len(cs) == 1 for cs in out)
    assert len({tuple(c.token_ids) for [c] in out}) > 250  # results belong to their prompts, not one repeated
    for i in (0, 1, 77, 150, 298, 299):
        [[alone]] = llm.generate([prompts[i]], greedy(3))
        assert out[i][0].token_ids == alone.token_ids and out[i][0].text == alone.text
    assert_idle(llm)


def test_n_completions_per_prompt_even_when_n_exceeds_the_queue(model, tokenizer):
    params = SamplingParams(max_tokens=4, temperature=1.0, n=3, seed=7, ignore_eos=True)
    ps = distinct_prompts(20)
    want = [[c.token_ids for c in engine(model, tokenizer).generate([p], params)[0]] for p in ps]
    eng = engine(model, tokenizer, max_waiting=2, max_num_seqs=2)  # window 4: one prompt (3 requests) at a time
    got = [(i, [c.token_ids for c in cs]) for i, cs in eng.generate_iter(ps, params)]
    assert got == list(enumerate(want))
    assert_idle(eng)


def test_a_refused_prompt_names_its_index_and_leaves_the_engine_idle(model, tokenizer):
    eng = engine(model, tokenizer, max_num_seqs=2)
    ps = distinct_prompts(10)
    ps[6] = []
    with pytest.raises(PromptError, match=r"prompt 6 \(counting from 0\): prompt is empty") as e:
        list(eng.generate_iter(ps, greedy(2)))
    assert e.value.index == 6 and isinstance(e.value, RequestError)
    assert_idle(eng)
    with pytest.raises(RequestError, match="max_tokens must be at least 1") as e:  # params: no prompt to blame
        list(eng.generate_iter(ps, greedy(0)))
    assert not isinstance(e.value, PromptError)
    assert_idle(eng)


def test_closing_the_iterator_early_aborts_what_is_in_flight(model, tokenizer):
    eng = engine(model, tokenizer, max_num_seqs=4)
    it = eng.generate_iter(distinct_prompts(100), greedy(5))
    assert next(it)[0] == 0
    assert eng.requests  # others are running
    it.close()
    assert_idle(eng)


def run_lazily(eng, num_prompts, params):
    """Feed generate_iter from a generator of num_prompts prompts, checking at every pull and every yield that
    no more than the window of requests is alive (in the engine, or done and waiting for an earlier prompt)."""
    window = offline_window(eng.cfg, params.n)
    state = {"pulled": 0, "yielded": 0, "max_alive": 0, "pulled_at_first_yield": None}

    def check():
        alive = state["pulled"] - state["yielded"]  # pulled and not yet yielded: everything the batch holds
        assert len(eng.requests) <= alive <= window
        state["max_alive"] = max(state["max_alive"], alive)

    def source():
        for i in range(num_prompts):
            state["pulled"] += 1
            check()
            yield [10 + i % 300, 10 + i // 300 % 300]

    for i, [c] in eng.generate_iter(source(), params):
        assert i == state["yielded"] and len(c.token_ids) == params.max_tokens
        if state["pulled_at_first_yield"] is None:
            state["pulled_at_first_yield"] = state["pulled"]
        check()
        state["yielded"] += 1
    assert state["yielded"] == state["pulled"] == num_prompts
    assert state["pulled_at_first_yield"] <= window  # pulled lazily, not read ahead
    assert state["max_alive"] == window  # and the window was kept full
    assert_idle(eng)


def test_a_stream_of_2000_prompts_is_pulled_lazily_with_bounded_requests(model, tokenizer):
    eng = engine(model, tokenizer, max_num_seqs=16)
    run_lazily(eng, 2000, greedy(2))


@pytest.mark.slow
def test_a_stream_of_100k_prompts_runs_in_a_bounded_window(model, tokenizer):
    eng = engine(model, tokenizer, max_num_seqs=64, max_num_batched_tokens=1024)
    t0 = time.perf_counter()
    run_lazily(eng, 100_000, greedy(1, seed=0))  # a seed: torch.seed() (seed=None) costs ~0.5 ms a request
    print(f"100k prompts in {time.perf_counter() - t0:.1f} s")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_varlen_generate_cli_streams_300_prompts_in_order(model_dir, tmp_path):
    ids = distinct_prompts(300)
    prompts = [f"def f{i}(x):" if i % 3 else ids[i] for i in range(300)]  # text and token-id prompts
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts[:150]] + [""]
                       + [{"prompt": p} for p in prompts[150:]])  # a blank line is skipped
    r = subprocess.run(varlen_cmd("generate", str(model_dir), "--prompts-file", str(path), "--max-tokens", "2",
                                  "--max-waiting", "8", "--no-progress", "--kv-cache-gib", "0.01"),
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["prompt"] for row in rows] == prompts
    assert all(set(row) == {"prompt", "text", "finish_reason", "completion_tokens"} for row in rows)
    assert {row["finish_reason"] for row in rows} <= {"length", "stop"}


def test_varlen_generate_stops_quietly_when_the_reader_leaves(model_dir, tmp_path):
    # 2,000 rows are more than a pipe buffers (64 KiB), so the writer meets the closed pipe: `... | head -1`.
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"x = {i}"} for i in range(2000)])
    proc = subprocess.Popen(varlen_cmd("generate", str(model_dir), "--prompts-file", str(path), "--max-tokens", "2",
                                       "--no-progress", "--kv-cache-gib", "0.01"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert json.loads(proc.stdout.readline())["prompt"] == "x = 0"
    proc.stdout.close()
    assert proc.wait(120) == 141
    assert "Traceback" not in proc.stderr.read()


@pytest.mark.parametrize("line, says", [
    ("{not json", "is not valid JSON"),
    ('["a list"]', 'is not a JSON object with a "prompt" field'),
    ('{"text": "x"}', 'is not a JSON object with a "prompt" field'),
    ('{"prompt": 5}', '"prompt" must be a string or a list of integer token ids, not 5'),
    ('{"prompt": [1, "2"]}', "\"prompt\" must be a string or a list of integer token ids, not [1, '2']"),
])
def test_a_bad_line_names_path_and_line_before_the_model_loads(tmp_path, capsys, line, says):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "", {"prompt": [1, 2]}, line, {"prompt": "b"}])
    assert main(["generate", str(tmp_path / "no-model-here"), "--prompts-file", str(path)]) == 2
    captured = capsys.readouterr()
    assert f"{path}:4" in captured.err and says in captured.err
    assert captured.out == ""


def test_a_prompt_the_engine_refuses_names_path_and_line(model_dir, tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}, "", {"prompt": ""}])
    assert main(["generate", str(model_dir), "--prompts-file", str(path), "--no-progress",
                 "--kv-cache-gib", "0.01"]) == 2
    assert f"{path}:4: prompt is empty" in capsys.readouterr().err
