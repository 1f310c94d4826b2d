"""Per-request logits processing (penalties, logit_bias, min_tokens, stop_token_ids) and failure isolation:
a request whose sampling fails in a step fails alone, and the rest of the step goes on."""
import pytest
import torch

from varlen.serve.request import Request, SamplingParams
from varlen.serve.sampler import SamplingFailed, process, sample

from .test_serve_engine import engine, greedy, model, prompts, tokenizer  # noqa: F401 (fixtures)


def run(eng, reqs):
    """Step until done; request id -> (token ids, finish reason, error)."""
    ids = [eng.add_request(p, params) for p, params in reqs]
    out = {r: [[], None, None] for r in ids}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id][0] += o.new_token_ids
            if o.finished:
                out[o.request_id][1:] = [o.finish_reason, o.error]
    return [out[r] for r in ids]


# ------------------------------------------------------------------------------------------ pure processing

def req_with(output_ids, prompt_ids=(1, 2), **params):
    r = Request("r", list(prompt_ids), SamplingParams(max_tokens=50, **params))
    r.output_ids = list(output_ids)
    return r


def test_presence_and_frequency_penalties_follow_openai_formula():
    logits = torch.linspace(-1, 1, 10)
    r = req_with([3, 3, 5], presence_penalty=0.5, frequency_penalty=0.25)
    out = process(logits, r, eod_id=0)
    want = logits.clone()
    want[3] -= 0.5 + 2 * 0.25
    want[5] -= 0.5 + 1 * 0.25
    assert torch.allclose(out, want)
    assert torch.equal(logits, torch.linspace(-1, 1, 10)), "the model's logits are not modified in place"


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -2.0, 2.0, -2.0, 1.0])
    out = process(logits, req_with([1], prompt_ids=[0], repetition_penalty=2.0), eod_id=4)
    assert out.tolist() == [1.0, -4.0, 2.0, -2.0, 1.0]


def test_logit_bias_and_min_tokens_mask():
    logits = torch.zeros(8)
    r = req_with([], logit_bias={2: 100.0, 5: -100.0}, min_tokens=3, stop_token_ids=[7])
    out = process(logits, r, eod_id=0)
    assert out[2] == 100 and out[5] == -100
    assert out[0] == float("-inf") and out[7] == float("-inf"), "eod and stop ids masked before min_tokens"
    r.output_ids = [1, 1, 1]
    assert process(logits, r, eod_id=0)[0] == 0, "no mask once min_tokens are out"


def test_tiny_temperature_samples_greedily_and_nan_is_an_error():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, SamplingParams(temperature=1e-40), torch.Generator()) == int(logits.argmax())
    with pytest.raises(SamplingFailed):
        process(torch.full((4,), float("-inf")), req_with([], logit_bias={1: 1.0}), eod_id=0)


# ------------------------------------------------------------------------------------------ in the engine

def test_tiny_temperature_request_runs_beside_others_and_equals_greedy(model, tokenizer):
    ps = prompts(4, seed=5)
    alone = [run(engine(model, tokenizer), [(p, greedy(10))])[0][0] for p in ps]
    reqs = [(p, greedy(10)) for p in ps[:3]] + [(ps[3], SamplingParams(max_tokens=10, temperature=1e-40,
                                                                     ignore_eos=True))]
    results = run(engine(model, tokenizer), reqs)
    assert [r[0] for r in results] == alone
    assert all(r[1] == "length" for r in results)


def test_non_finite_logits_fail_only_their_request(model, tokenizer, monkeypatch):
    ps = prompts(5, seed=6)
    alone = [run(engine(model, tokenizer), [(p, greedy(8))])[0][0] for p in ps]
    eng = engine(model, tokenizer)
    real = eng.runner.run

    def poisoned(scheduled):
        results = real(scheduled)
        for (req, _), logits in zip(scheduled, results):
            if req.request_id == "req-2" and len(req.output_ids) == 3:  # the third request added
                logits.base = logits.base.clone()
                logits.base[0, 7] = float("nan")
        return results

    monkeypatch.setattr(eng.runner, "run", poisoned)
    out = run(eng, [(p, greedy(8)) for p in ps])
    assert out[2][1] == "error" and "non-finite" in out[2][2]
    for i, r in enumerate(out):
        if i != 2:
            assert r == [alone[i], "length", None]
    eng.blocks.check([])  # every block back, the failed request's too


def test_a_processor_that_raises_fails_its_request_alone(model, tokenizer):
    class Broken:
        def mask_logits_(self, logits):
            raise RuntimeError("grammar engine fell over")

        def advance(self, token):
            pass

    ps = prompts(3, seed=7)
    eng = engine(model, tokenizer)
    ids = [eng.add_request(p, greedy(6)) for p in ps]
    eng.requests[ids[1]].guide = Broken()
    eng.requests[ids[1]].params.grammar = "broken"  # so the request runs its processors
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = (o.finish_reason, o.error)
    assert done[ids[1]] == ("error", "grammar engine fell over")
    assert done[ids[0]] == done[ids[2]] == ("length", None)
    eng.blocks.check([])


def test_logit_bias_min_tokens_and_stop_token_ids_in_the_engine(model, tokenizer):
    eod = tokenizer.eod_id
    p = prompts(1, seed=8)[0]
    [(forced, reason, _)] = run(engine(model, tokenizer), [(p, SamplingParams(max_tokens=6, temperature=0.7, seed=1,
                                                                            logit_bias={9: 100.0}, ignore_eos=True))])
    assert forced == [9] * 6 and reason == "length"
    # eod made certain, but min_tokens holds it off for exactly 4 tokens
    [(ids, reason, _)] = run(engine(model, tokenizer), [(p, SamplingParams(max_tokens=20, temperature=0,
                                                                         logit_bias={eod: 100.0}, min_tokens=4))])
    assert len(ids) == 4 and reason == "stop" and eod not in ids
    [(ids, reason, _)] = run(engine(model, tokenizer), [(p, SamplingParams(max_tokens=20, temperature=0,
                                                                         logit_bias={11: 100.0}, stop_token_ids=[11]))])
    assert ids == [] and reason == "stop"


def test_out_of_vocabulary_bias_is_refused(model, tokenizer):
    from varlen.serve.request import RequestError
    with pytest.raises(RequestError, match="logit_bias names token 99999"):
        engine(model, tokenizer).add_request([1, 2], SamplingParams(logit_bias={99999: 1.0}))
