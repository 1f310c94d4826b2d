"""Property-based fuzzing of the live server from its own /openapi.json, with schemathesis 4.x (its CLI, as a
subprocess: `python -m schemathesis.cli run URL ...`).

The contract: /openapi.json documents the request bodies of /v1/completions and /v1/chat/completions (so
the fuzzer can build valid and invalid bodies), and across every operation, with a bounded number of
examples each, no request gets a 5xx, no request breaks the connection or hangs, and every response that
has a documented schema matches it. Other schemathesis findings (undocumented status codes, schema-valid
bodies the server refuses for reasons the schema cannot express such as prompt + max_tokens > context, ...)
are reported in the test output but do not fail it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from tests.test_server import KEY, model_dir  # noqa: F401  (model_dir is a fixture used here)
from tests.test_soak import SoakServer

pytest.importorskip("schemathesis")

# A short context bounds the work any generated body can ask for: max_tokens above it (or a prompt that does
# not fit) is refused, and anything accepted generates at most 128 tokens per choice on the tiny model.
FUZZ_ARGS = ("--max-model-len", "128")
MAX_EXAMPLES = 25
# Failure kinds (schemathesis' failure class names) that fail the test: a 5xx, or a response that does not
# match its documented schema / is not the JSON it is documented to be.
REQUIRED_CLEAN = {"ServerError", "ContentTypeServerError", "JsonSchemaError", "MalformedJson",
                  "DiscriminatorMismatch"}


@pytest.fixture(scope="module")
def fuzz_server(model_dir):  # noqa: F811
    s = SoakServer(model_dir, *FUZZ_ARGS)
    yield s
    s.close()


def _resolve(spec: dict, node: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        node = spec
        for part in ref[2:].split("/"):
            node = node[part]
    return node


def _object_shape(spec: dict, schema: dict) -> tuple[set, set]:
    """(property names, required names) of an object schema, through $ref / allOf / anyOf / oneOf."""
    schema = _resolve(spec, schema)
    props, required = set(schema.get("properties", {})), set(schema.get("required", []))
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            p, r = _object_shape(spec, sub)
            props |= p
            if key == "allOf":
                required |= r
    return props, required


def test_openapi_documents_request_and_response_bodies(fuzz_server):
    spec = httpx.get(fuzz_server.url + "/openapi.json", timeout=10).json()
    paths = spec.get("paths", {})
    problems = []
    for path, must_have, required in [("/v1/completions", {"prompt", "max_tokens", "temperature", "top_p", "n",
                                                            "stream", "logprobs", "seed"}, {"prompt"}),
                                      ("/v1/chat/completions", {"messages", "max_tokens", "temperature", "top_p",
                                                                "n", "stream", "logprobs", "top_logprobs"},
                                       {"messages"})]:
        op = paths.get(path, {}).get("post")
        if op is None:
            problems.append(f"POST {path} is not in /openapi.json")
            continue
        body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if body is None:
            problems.append(f"POST {path} documents no application/json request body")
        else:
            props, req = _object_shape(spec, body)
            if must_have - props:
                problems.append(f"POST {path} request body lacks properties {sorted(must_have - props)}")
            if required - req:
                problems.append(f"POST {path} request body does not require {sorted(required - req)}")
        ok = op.get("responses", {}).get("200", {}).get("content", {}).get("application/json", {}).get("schema")
        if not ok or not {"choices", "usage"} <= _object_shape(spec, ok)[0]:
            problems.append(f"POST {path} documents no 200 body with 'choices' and 'usage'")
    models = paths.get("/v1/models", {}).get("get", {}).get("responses", {}).get("200", {})
    schema = models.get("content", {}).get("application/json", {}).get("schema")
    if not schema or "data" not in _object_shape(spec, schema)[0]:
        problems.append("GET /v1/models documents no 200 body with 'data'")
    assert not problems, "\n".join(problems)


def run_schemathesis(server, tmp_path, max_examples: int = MAX_EXAMPLES, seed: int = 0) -> tuple[dict, str, float]:
    report = tmp_path / "schemathesis.json"
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
           "--checks", "all", "--continue-on-failure", "--no-shrink",
           "--header", f"Authorization: Bearer {KEY}",
           "--max-examples", str(max_examples), "--seed", str(seed),
           "--phases", "examples,coverage,fuzzing",          # no stateful phase: no links to follow
           "--generation-database", "none",                  # nothing kept between runs
           "--suppress-health-check", "all", "--request-timeout", "30", "--workers", "2",
           "--output-sanitize", "false",                     # show max_tokens etc. in reproductions
           "--no-color", "--report", "json", "--report-json-path", str(report)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    assert report.is_file(), f"schemathesis wrote no report (exit {proc.returncode})\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(report.read_text()), proc.stdout, elapsed


def test_schemathesis_no_server_errors_or_schema_violations(fuzz_server, tmp_path):
    doc, out, elapsed = run_schemathesis(fuzz_server, tmp_path)
    failures = doc["failures"]
    required = [f for f in failures if f["type"] in REQUIRED_CLEAN]
    summary = (f"schemathesis {doc['schemathesis_version']}: {doc['running_time']:.1f} s (wall {elapsed:.1f} s), "
               f"operations {doc['operations']}, test cases {doc['test_cases']}, phases "
               f"{ {k: v['status'] for k, v in (doc['phases'] or {}).items()} }\n"
               + "\n".join(f"  {'FAIL' if f in required else 'info'} {f['code']} {f['title']} x{f['count']}: "
                           f"{', '.join(f['operations'])}" for f in failures)
               + "".join(f"\n  ERROR {e['title']} x{e['count']}" for e in doc["errors"]))
    print(out)  # schemathesis' own report, with a curl line per failure: shown by pytest when the test fails
    print(summary)
    tail = out[-3000:]
    assert doc["complete"] and doc["operations"] and doc["operations"]["errored"] == 0, f"{summary}\n{tail}"
    assert not doc["errors"], f"requests that errored (connection broken, timeout, ...)\n{summary}\n{tail}"
    assert not required, f"5xx responses or response-schema violations\n{summary}\n{tail}"
    assert fuzz_server.alive(), f"server died under the fuzzer\n{summary}\n{fuzz_server.tail()}"
    fuzz_server.wait_idle(timeout=30)
