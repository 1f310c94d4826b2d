"""The HTTP server for real: a subprocess on a free port, driven by the `openai` client and raw httpx."""
import json
import re
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from varlen.checkpoint.hf_llama import save_varlen
from varlen.config import Config, ModelConfig
from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import train_tokenizer
from varlen.model.transformer import Transformer

openai = pytest.importorskip("openai")

KEY = "sk-test-123"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:30]], 320)
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=2,
                                   max_seq_len=1024))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    return save_varlen(model, cfg, tok, tmp_path_factory.mktemp("srv") / "tiny")


class Server:
    def __init__(self, model_dir, *extra):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "varlen", "serve", str(model_dir), "--port",
                                      str(self.port), "--api-key", KEY, "--kv-cache-gib", "0.02", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            assert self.proc.poll() is None, self.proc.stdout.read()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("server did not become healthy in 60 s")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def post(self, path, body, key=KEY, **kw):
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, timeout=30,
                          headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}, **kw)

    def metric(self, name) -> float:
        text = httpx.get(self.url + "/metrics", timeout=5).text
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def wait_idle(self, timeout=20) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.metric("varlen_kv_blocks_used") == 0 and self.metric("varlen_requests_running") == 0:
                return
            time.sleep(0.1)
        raise AssertionError("blocks were not freed")

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(model_dir):
    s = Server(model_dir)
    yield s
    s.close()


GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


def test_completion_with_usage_and_models(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    r = server.client.completions.create(model="tiny", prompt="def main():", max_tokens=12, **GREEDY)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens > 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_streaming_equals_non_streaming_and_ends_with_done(server):
    whole = server.client.completions.create(model="tiny", prompt="import os\n", max_tokens=20, **GREEDY)
    chunks = list(server.client.completions.create(model="tiny", prompt="import os\n", max_tokens=20, stream=True,
                                                   stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    raw = server.post("/v1/completions", {"prompt": "x", "max_tokens": 3, "stream": True, "temperature": 0})
    events = [line for line in raw.text.splitlines() if line.startswith("data: ")]
    assert raw.status_code == 200 and events[-1] == "data: [DONE]"


def test_chat_streaming_and_not(server):
    msgs = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop, please."}]
    whole = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, **GREEDY)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens == 15
    parts = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=15, stream=True, **GREEDY)
    text = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert text == whole.choices[0].message.content


def test_n_and_logprobs(server):
    r = server.client.completions.create(model="tiny", prompt="class A:", max_tokens=5, n=3, temperature=1.0,
                                         seed=4, logprobs=2, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2] and r.usage.completion_tokens == 15
    assert all(len(c.logprobs.token_logprobs) == 5 for c in r.choices)


def test_api_key_is_required(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


BAD = [
    (b"{not json", 400), (b'{"prompt": "\xff\xfe", "max_tokens": 2}', 400), (b"[1, 2]", 400),
    ({"prompt": "x", "model": "gpt-4"}, 404), ({"prompt": ""}, 400), ({"prompt": 12}, 400),
    ({"prompt": "x", "max_tokens": "ten"}, 400), ({"prompt": "x", "max_tokens": 0}, 400),
    ({"prompt": "x", "max_tokens": 100_000}, 400), ({"prompt": "x " * 1100, "max_tokens": 5}, 400),
    ({"prompt": "x", "temperature": -1}, 400), ({"prompt": "x", "top_p": 0}, 400), ({"prompt": "x", "top_p": 1.5}, 400),
    ({"prompt": "x", "n": 100}, 400), ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"prompt": "x", "stop": 5}, 400), ({"prompt": "x", "seed": 2 ** 70}, 400), ({"prompt": [[]]}, 400), ({"prompt": []}, 400),
    ({"prompt": [1, 10 ** 9]}, 400), ({"messages": "hi"}, 400), ({"prompt": "x", "logprobs": 99}, 400), ({"prompt": "x", "stream": "yes"}, 400),
]


def test_bad_requests_get_4xx_while_a_stream_finishes(server):
    want = server.client.completions.create(model="tiny", prompt="for i in", max_tokens=60, **GREEDY).choices[0].text
    got = []

    def stream():
        for c in server.client.completions.create(model="tiny", prompt="for i in", max_tokens=60, stream=True, **GREEDY):
            got.append(c.choices[0].text)
    t = threading.Thread(target=stream)
    t.start()
    for body, status in BAD:
        r = server.post("/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"]
    chat = server.post("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]})
    assert chat.status_code == 400 and "role" in chat.json()["error"]["message"]
    t.join(60)
    assert "".join(got) == want
    server.wait_idle()


def test_disconnect_cancels_and_frees_blocks(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "def f():", "max_tokens": 200, "stream": True, "temperature": 0,
                            "ignore_eos": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i == 3:
                break
    server.wait_idle()
    with pytest.raises(httpx.ReadTimeout):  # not streaming: the client gives up before the answer
        httpx.post(server.url + "/v1/completions", timeout=0.3, headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "def g():", "max_tokens": 1000, "temperature": 0, "ignore_eos": True})
    server.wait_idle()
    assert server.metric('varlen_requests_finished_total{reason="abort"}') >= 2


def test_queue_limit_answers_429_with_retry_after(model_dir):
    # float32: the 1000-token request must finish within the client's 30 s, and on a busy 2-core CPU this tiny
    # model decodes 1.5-3x slower in bf16 (what --dtype auto picks on a CPU with bf16 matrix units).
    s = Server(model_dir, "--max-num-seqs", "1", "--max-waiting", "1", "--dtype", "float32")
    try:
        body = {"prompt": "x", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.post("/v1/completions", body))) for _ in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.2)
        for t in threads:
            t.join(60)
        codes = sorted(r.status_code for r in results)
        assert 429 in codes and 200 in codes, codes
        limited = next(r for r in results if r.status_code == 429)
        assert limited.headers["retry-after"] == "1" and limited.json()["error"]["type"] == "rate_limit_error"
        s.wait_idle()
    finally:
        s.close()


@pytest.mark.parametrize("kind", ["block", "mlp"])
def test_speculative_server_streams_the_ordinary_greedy_text_and_reports_acceptance(tmp_path, kind):
    from varlen.config import ServeConfig
    from varlen.serve.engine import Engine
    from varlen.serve.request import SamplingParams

    tok = train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:30]], 320)
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layer=2, n_head=4, n_kv_head=2,
                                   max_seq_len=256, mtp_heads=2, mtp_head=kind))
    torch.manual_seed(0)
    model = Transformer(cfg.model).eval()
    path = save_varlen(model, cfg, tok, tmp_path / "heads")
    # float32 on both sides: speculative output is ordinary output exactly there (in bf16 a verify step's rows
    # round differently from one-token decodes, so a near-tie may go the other way).
    [[want]] = Engine(model, tok, ServeConfig(kv_cache_gib=0.01, dtype="float32")).generate(
        ["import os\n"], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    s = Server(path, "--speculative", "--fixed-drafts", "--dtype", "float32")  # random heads: adaptive drafts none
    try:
        whole = s.client.completions.create(model="heads", prompt="import os\n", max_tokens=20, **GREEDY)
        chunks = s.client.completions.create(model="heads", prompt="import os\n", max_tokens=20, stream=True, **GREEDY)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text == want.text
        s.wait_idle()
        assert s.metric('varlen_spec_draft_tokens_total{head="2"}') > 0
        assert 0 <= s.metric('varlen_spec_acceptance_rate{head="1"}') <= 1
        assert s.metric("varlen_spec_tokens_per_step") >= 1
    finally:
        s.close()
