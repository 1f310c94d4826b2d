"""The OpenAI surface for real (a server subprocess on a free port, the openai client and httpx): prompt lists,
penalties, logprobs in streams, structured output, HF chat templates, cached tokens, unsupported fields,
the published schema, Prometheus metrics, and an engine that dies taking the process down with it."""
import json
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from varlen.data.tokenizer import TextTokenizer

from .test_server import KEY, Server, free_port, model_dir  # noqa: F401 (fixture)

openai = pytest.importorskip("openai")
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def server(model_dir):  # noqa: F811
    s = Server(model_dir)
    yield s
    s.close()


def test_a_list_of_prompts_gives_n_choices_per_prompt_in_order(server):
    prompts = ["def a():", "class B:", "import c"]
    r = server.client.completions.create(model="tiny", prompt=prompts, max_tokens=4, n=2, **GREEDY)
    assert [c.index for c in r.choices] == list(range(6))
    for i, p in enumerate(prompts):
        alone = server.client.completions.create(model="tiny", prompt=p, max_tokens=4, **GREEDY).choices[0].text
        assert r.choices[2 * i].text == r.choices[2 * i + 1].text == alone
    assert r.usage.completion_tokens == 24
    ids = server.client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, **GREEDY)
    assert len(ids.choices) == 2


def test_penalties_bias_and_min_tokens_change_the_output(server):
    base = server.client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=12, **GREEDY).choices[0].text
    pen = server.client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=12, frequency_penalty=2.0,
                                           presence_penalty=2.0, **GREEDY).choices[0].text
    assert pen != base
    forced = server.client.completions.create(model="tiny", prompt="x", max_tokens=5, temperature=1.0,
                                              logit_bias={"65": 100}, logprobs=0, extra_body={"ignore_eos": True})
    assert len(set(forced.choices[0].logprobs.tokens)) == 1
    rep = server.client.completions.create(model="tiny", prompt="x = 1\n", max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True, "repetition_penalty": 3.0})
    assert rep.choices[0].text != base


def test_logprobs_stream_with_their_tokens_for_completions_and_chat(server):
    whole = server.client.completions.create(model="tiny", prompt="for x in", max_tokens=16, logprobs=2, **GREEDY)
    chunks = list(server.client.completions.create(model="tiny", prompt="for x in", max_tokens=16, logprobs=2,
                                                   stream=True, **GREEDY))
    streamed = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(whole.choices[0].logprobs.token_logprobs)
    assert len(streamed) == 16
    msgs = [{"role": "user", "content": "hello"}]
    chat = server.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, logprobs=True,
                                                 top_logprobs=2, stream=True, **GREEDY)
    entries = [e for c in chat if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == 10 and all(len(e.top_logprobs) == 2 for e in entries)


def test_chat_without_max_tokens_may_fill_the_context(server):
    # OpenAI's chat default: no cap below the context (completions keep their default of 16).
    msgs = [{"role": "user", "content": "hello"}]
    chat = server.client.chat.completions.create(model="tiny", messages=msgs, **GREEDY)
    done = chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.usage.completion_tokens > 16 and chat.choices[0].finish_reason == "length"
    assert done == server.client.models.list().data[0].max_model_len
    text = server.client.completions.create(model="tiny", prompt="hello", **GREEDY)
    assert text.usage.completion_tokens == 16


def test_json_object_and_json_schema_outputs_parse_and_validate(server):
    r = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "json"}],
                                              max_tokens=200, temperature=0.8, seed=1,
                                              response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    for seed in range(3):
        r = server.client.completions.create(
            model="tiny", prompt="person:", max_tokens=200, temperature=1.0, seed=seed,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}})
        assert r.choices[0].finish_reason == "stop", r.choices[0].text
        obj = json.loads(r.choices[0].text)
        assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and len(obj["name"]) <= 6
        assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 99
    bad = server.post("/v1/completions", {"prompt": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "b", "schema": {"type": "nonsense"}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_cached_tokens_report_the_prefix_cache(server):
    prompt = "def long_function_name(argument_one, argument_two):\n    return argument_one + argument_two\n" * 3
    first = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    second = server.client.completions.create(model="tiny", prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < second.usage.prompt_tokens and cached % 16 == 0
    assert server.metric("varlen_prefix_cache_hit_blocks_total") >= cached // 16


@pytest.mark.parametrize("field,value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("suffix", "x"), ("echo", True), ("best_of", 3), ("frobnicate", 1)])
def test_unsupported_fields_get_a_400_naming_them(server, field, value):
    r = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and field in err["message"]


def test_openapi_describes_every_request_field(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    fields = set(schemas["CompletionRequest"]["properties"])
    assert {"prompt", "max_tokens", "temperature", "logit_bias", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "min_tokens", "stop_token_ids", "response_format", "logprobs"} <= fields
    assert "messages" in schemas["ChatCompletionRequest"]["properties"]
    op = spec["paths"]["/v1/chat/completions"]["post"]
    assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
    assert {"400", "401", "429"} <= set(op["responses"])


def test_metrics_parse_as_prometheus_text(server):
    from prometheus_client.parser import text_string_to_metric_families
    server.client.completions.create(model="tiny", prompt="x", max_tokens=2, **GREEDY)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
    for name in ("varlen_requests_running", "varlen_requests_waiting", "varlen_kv_blocks_used",
                 "varlen_kv_blocks_total", "varlen_generation_tokens", "varlen_requests_finished",
                 "varlen_time_to_first_token_seconds", "varlen_inter_token_latency_seconds",
                 "varlen_prefix_cache_hit_rate", "varlen_prefix_cache_hit_blocks"):
        assert name in families, name


def test_hf_chat_template_is_used(model_dir, tmp_path):  # noqa: F811
    d = tmp_path / "chatml"
    shutil.copytree(model_dir, d)
    conf = json.loads((d / "tokenizer_config.json").read_text())
    conf["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    s = Server(d)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        r = s.client.chat.completions.create(model="chatml", messages=msgs, max_tokens=3, **GREEDY)
        # As transformers' apply_chat_template: the rendered text, tokenized without adding special tokens.
        ids = TextTokenizer.load_dir(d).encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        same = s.post("/v1/completions", {"prompt": ids, "max_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert r.choices[0].message.content == same.json()["choices"][0]["text"]
        assert r.usage.prompt_tokens == len(ids)
        bad = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                      "image_url": {"url": "x"}}]}]})
        assert bad.status_code == 400
    finally:
        s.close()


DIE = """
import sys
from varlen.serve import engine
calls = {"n": 0}
real = engine.Engine.step
def step(self):
    calls["n"] += 1
    if calls["n"] > 3:
        raise MemoryError("injected fault")
    return real(self)
engine.Engine.step = step
from varlen.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_engine_death_fails_requests_answers_503_and_exits_nonzero(model_dir):  # noqa: F811
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", DIE, "serve", str(model_dir), "--port", str(port),
                             "--kv-cache-gib", "0.02"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 50}, timeout=30)
        assert r.status_code == 503 and "injected fault" in r.json()["error"]["message"]
        health = httpx.get(url + "/health", timeout=5)
        assert health.status_code == 503 and "injected fault" in health.json()["detail"]
        assert proc.wait(30) != 0
    finally:
        proc.kill()
    assert "injected fault" in proc.stdout.read()
