"""Speculative decoding with the MTP heads: greedy output equals ordinary greedy token for token (alone, in a
busy batch, under preemption), sampling keeps the model's distribution exactly (chi-square), and rejected
drafts never leak a block nor reach the prefix cache.

Exactness is tested in float32: in bf16 a verify step's rows round differently from one-token decode steps,
so a near-tie can go the other way. One test runs in the dtype `auto` picks here (bf16 on CPUs with bf16 matrix
units) and checks what holds in any dtype."""
import copy
import functools
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from varlen.batch import Batch
from varlen.config import ConfigError, ModelConfig, ServeConfig
from varlen.data.corpus import stdlib_files
from varlen.data.tokenizer import train_tokenizer
from varlen.model.mtp import head_targets
from varlen.model.transformer import Transformer
from varlen.serve.async_engine import speculative_metrics
from varlen.serve.block_manager import BlockManager
from varlen.serve.engine import Engine
from varlen.serve.request import Request, SamplingParams, Status
from varlen.serve.runner import kv_bytes_per_token
from varlen.serve.scheduler import Scheduler
from varlen.serve.speculate import SpecStats, accept, confidences, draft_length, verify_greedy, verify_sampling

from .test_serve_blocks import ops, run_traffic

CFG = ModelConfig(vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=256, mtp_heads=3,
                  tie_embeddings=False)


# ------------------------------------------------------------------------------------------------ models

class Letters:
    """A tokenizer for tiny vocabularies: token i is one character, so stop strings can cut any token run."""

    def __init__(self, eod_id: int = 1):
        self.bos_id, self.eod_id = 0, eod_id

    def encode(self, text: str) -> list[int]:
        return [ord(c) - 0x100 for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(0x100 + i) for i in ids)

    def decode_stream(self):
        return self  # one character per token: step(id) is that character

    def step(self, token: int) -> str:
        return chr(0x100 + token)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:30]], 320)


@pytest.fixture(scope="module")
def sharp():
    """A random model with random heads: a head block starts near the identity, so head j guesses the next
    token rather than the one j further, and nearly every draft is rejected. Sharp logits make ties unlikely
    (scaled at the output: a scaled tied embedding would make the model repeat its last token, and the heads
    would be right)."""
    torch.manual_seed(0)
    m = Transformer(CFG).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m


CYCLE_V = 48


@pytest.fixture(scope="module", params=["block", "mlp"])
def cycle(request):
    """A model trained for a few seconds on walks along one fixed cycle through the vocabulary (15% random
    jumps): its heads learn the cycle too, so most drafts are right, as with a trained model's heads. Once
    with each kind of head: block heads draft from their cache, mlp heads from the trunk state alone."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=CYCLE_V, dim=48, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=160, mtp_heads=3,
                      mtp_head=request.param)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(CYCLE_V, generator=g)
    succ = torch.empty(CYCLE_V, dtype=torch.long)
    succ[order] = order.roll(-1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    n_seq, length = 16, 48
    batch = Batch.from_seqlens([length] * n_seq)
    for _ in range(40):
        seq = torch.empty(n_seq, length + 1, dtype=torch.long)
        seq[:, 0] = torch.randint(0, CYCLE_V, (n_seq,), generator=g)
        for t in range(length):
            jump = torch.rand(n_seq, generator=g) < 0.15
            seq[:, t + 1] = torch.where(jump, torch.randint(0, CYCLE_V, (n_seq,), generator=g), succ[seq[:, t]])
        ids, targets = seq[:, :-1].reshape(-1), seq[:, 1:].reshape(-1)
        base, heads = model(ids, batch, heads=True)
        loss = F.cross_entropy(base, targets) + sum(
            F.cross_entropy(h, head_targets(targets, batch.cu_seqlens, j)) for j, h in enumerate(heads, start=1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def engine(model, tok, **kw):
    kw.setdefault("kv_cache_gib", 0.01)
    # Every draft verified: the mechanism under test, independent of the costs an adaptive engine times.
    kw.setdefault("adaptive_drafts", False)
    # Engines cast their model in place: float32 also keeps the module-scoped models float32 for every test.
    kw.setdefault("dtype", "float32")
    return Engine(model, tok, ServeConfig(**kw))


def prompts(n, vocab, seed=0, lo=1, hi=60):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def greedy(max_tokens, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=0, **{"ignore_eos": True, **kw})


def run(eng, requests, draft_with=None):
    """requests: (request_id, prompt, params, step it arrives at) -> {id: (token ids, text, finish reason)},
    and the largest number of tokens one stream event carried."""
    if draft_with is not None:
        eng._draft = draft_with(eng)
    out, acc, most, step = {}, {}, 0, 0
    while len(out) < len(requests):
        for rid, prompt, params, at in requests:
            if at == step:
                eng.add_request(prompt, params, rid)
        for o in eng.step():
            ids, text = acc.setdefault(o.request_id, ([], []))
            ids += o.new_token_ids
            text.append(o.new_text)
            most = max(most, len(o.new_token_ids))
            if o.finished:
                out[o.request_id] = (ids, "".join(text), o.finish_reason)
        step += 1
        assert step < 10_000
    assert eng.blocks.num_free_blocks == eng.blocks.num_blocks
    return out, most


def ordinary(model, tok, requests, **kw):
    """Each request alone through an ordinary (non-speculative) engine."""
    return {rid: run(engine(model, tok, **kw), [(rid, p, params, 0)])[0][rid] for rid, p, params, _ in requests}


def forced_drafts(continuations: dict[str, list[int]], vocab: int, corrupt: float = 0.35, seed: int = 0):
    """A draft source that is right most of the time: the request's true greedy continuation with each token
    replaced by a random one with probability `corrupt`, padded with random tokens past its end (drafts
    beyond max_tokens must be cut too)."""
    rng = random.Random(seed)

    def make(eng):
        def _draft(req, head_rows):
            done = len(req.output_ids)
            want = continuations[req.request_id][done:done + eng.num_speculative]
            want += [rng.randrange(vocab) for _ in range(eng.num_speculative - len(want))]
            req.draft_ids = [t if rng.random() > corrupt else rng.randrange(vocab) for t in want]
            req.draft_probs = None
        return _draft
    return make


def busy_requests(vocab, seed=2):
    """12 requests: mixed prompt lengths and max_tokens, arriving over the first steps."""
    return [(f"r{i}", p, greedy(6 + 3 * i), i // 3) for i, p in enumerate(prompts(12, vocab, seed=seed))]


def with_stop(requests, want, model, tok):
    """Give one request a stop string from the middle of its ordinary output; its new ordinary output."""
    for k, (rid, p, params, at) in enumerate(requests):
        text = want[rid][1]
        stop = text[len(text) // 2:len(text) // 2 + 2]
        if len(stop) == 2 and "\ufffd" not in stop:
            requests[k] = (rid, p, SamplingParams(**{**params.__dict__, "stop": [stop]}), at)
            want[rid] = ordinary(model, tok, [requests[k]])[rid]
            assert want[rid][2] == "stop"
            return requests, want
    raise AssertionError("no request's text has a clean two-character stop string")


# ------------------------------------------------------------------------------------------------ greedy

@pytest.mark.parametrize("budget", [512, 7])  # 7: prefills in chunks, and drafts trimmed to the budget
@pytest.mark.parametrize("drafts", ["heads", "forced"])
def test_greedy_speculative_equals_greedy_in_a_busy_batch_with_random_heads(sharp, tokenizer, budget, drafts):
    reqs = busy_requests(CFG.vocab_size)
    reqs, want = with_stop(reqs, ordinary(sharp, tokenizer, reqs), sharp, tokenizer)
    eng = engine(sharp, tokenizer, speculative=True, max_num_batched_tokens=budget)
    source = forced_drafts({r: w[0] for r, w in want.items()}, CFG.vocab_size) if drafts == "forced" else None
    got, most = run(eng, reqs, source)
    assert got == want
    s = eng.spec_stats
    if drafts == "forced":  # right drafts are accepted, wrong ones (and what follows) rejected
        assert most > 1 and 0.2 < s.acceptance[0] < 0.9 and s.verify_steps > 20
    else:
        assert s.drafted[0] > 20 and s.acceptance[0] < 0.2


@pytest.mark.parametrize("drafts", ["heads", "forced"])
def test_greedy_speculative_equals_greedy_with_trained_heads(cycle, drafts):
    tok = Letters()
    reqs, want = with_stop(busy_requests(CYCLE_V, seed=3), ordinary(cycle, tok, busy_requests(CYCLE_V, seed=3)),
                           cycle, tok)
    eng = engine(cycle, tok, speculative=True)
    source = forced_drafts({r: w[0] for r, w in want.items()}, CYCLE_V) if drafts == "forced" else None
    got, most = run(eng, reqs, source)
    assert got == want
    if drafts == "heads":  # the heads learned the cycle: most steps emit several tokens
        s = eng.spec_stats
        assert most == 4 and s.acceptance[0] > 0.8 and s.tokens_per_step > 2.5, (s.acceptance, s.tokens_per_step)


def test_adaptive_drafts_keep_greedy_output_and_verify_only_drafts_that_pay(cycle):
    tok = Letters()
    reqs = busy_requests(CYCLE_V, seed=3)
    want = ordinary(cycle, tok, reqs)
    eng = engine(cycle, tok, speculative=True, adaptive_drafts=True)
    c = eng.verify_costs  # timed at start: steps of 1 .. 4 new tokens, relative to 1
    assert len(c) == 4 and c[0] == 1.0 and c == sorted(c), c
    cases = [([1.0] * 4, lambda s: s.tokens_per_step > 2.5),                       # free drafts: all verified
             ([1.0, 1.1, 50, 50], lambda s: s.drafted[0] > 20 and s.drafted[1] == 0),  # only the first pays
             ([1.0, 50, 50, 50], lambda s: s.drafted[0] == 0)]                        # none pays
    for costs, check in cases:
        eng = engine(cycle, tok, speculative=True, adaptive_drafts=True)
        eng.verify_costs = costs
        assert run(eng, reqs)[0] == want
        assert check(eng.spec_stats), (costs, eng.spec_stats)
    # A seeded request drafts every step regardless: its tokens must not depend on timed costs.
    params = SamplingParams(max_tokens=15, temperature=1.0, seed=7, ignore_eos=True)
    eng.generate([prompts(1, CYCLE_V, seed=5)[0]], params)
    assert eng.spec_stats.drafted[2] > 0


def test_draft_length_examples():
    assert draft_length([0.9, 0.8, 0.7], [1.0, 1.0, 1.0, 1.0]) == 3
    assert draft_length([0.3, 0.15, 0.1], [1.0, 2.2, 2.4, 2.6]) == 0       # 2026-12-03's tiny model in bf16
    assert draft_length([0.9, 0.2, 0.9], [1.0, 1.1, 1.3, 1.5]) == 1         # a doubtful second head ends the run
    assert draft_length([0.9, 0.9], [1.0, 1.05]) == 1                       # fewer costs than drafts: as far as known
    assert draft_length([], [1.0]) == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=0, max_size=5),
       st.lists(st.floats(0, 3), min_size=5, max_size=5))
def test_draft_length_maximizes_expected_tokens_per_unit_cost(conf, steps):
    costs = [1.0]
    for s in steps:
        costs.append(costs[-1] + s)
    d = draft_length(conf, costs)

    def rate(e):
        expected = 1 + sum(math.prod(conf[:i]) for i in range(1, e + 1))
        return expected / costs[e]
    rates = [rate(e) for e in range(len(conf) + 1)]
    assert 0 <= d <= len(conf)
    assert rates[d] >= max(rates) * (1 - 1e-9)
    assert all(rates[e] <= rates[d] * (1 + 1e-9) for e in range(d))     # no shorter run as good (ties: fewer)


def test_confidences_come_from_the_head_distributions_not_the_drafts():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert confidences(logits, None) == pytest.approx([math.exp(2) / (math.exp(2) + 2), 1 / 3])
    q = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert confidences(logits, q) == pytest.approx([0.5, 0.8])  # whatever was drawn from q


def test_speculative_in_the_auto_dtype_agrees_with_ordinary_decoding_and_frees_blocks(cycle):
    model, tok = copy.deepcopy(cycle), Letters()  # a copy: these engines cast it (to bf16 on this machine)
    reqs = busy_requests(CYCLE_V, seed=3)
    want = ordinary(model, tok, reqs, dtype="auto")
    eng = engine(model, tok, speculative=True, dtype="auto")
    got, most = run(eng, reqs)  # run() checks that every block came back
    assert {p.dtype for p in model.parameters()} == {eng.precision.dtype}
    assert {r: (len(ids), reason) for r, (ids, _, reason) in got.items()} == \
        {r: (len(ids), reason) for r, (ids, _, reason) in want.items()}
    same = sum(a == b for r in want for a, b in zip(got[r][0], want[r][0]))
    assert same / sum(len(w[0]) for w in want.values()) > 0.9
    assert most > 1 and eng.spec_stats.acceptance[0] > 0.8


def test_eod_inside_an_accepted_run_ends_the_request_there(cycle):
    prompt = [5, 9]
    [[full]] = engine(cycle, Letters()).generate([prompt], greedy(30))
    tok = Letters(eod_id=full.token_ids[7])  # a token greedy decoding reaches mid-way, while the heads are right
    params = greedy(30, ignore_eos=False)
    [[want]] = engine(cycle, tok).generate([prompt], params)
    eng = engine(cycle, tok, speculative=True)
    [[got]] = eng.generate([prompt], params)
    assert (got.token_ids, got.finish_reason) == (want.token_ids, "stop")
    assert len(got.token_ids) < 30 and eng.spec_stats.acceptance[0] > 0.5


def test_preemption_under_a_tiny_cache_gives_the_same_tokens(cycle):
    tok = Letters()
    reqs = [(f"p{i}", p, greedy(40), 0) for i, p in enumerate(prompts(6, CYCLE_V, seed=4, lo=20, hi=40))]
    want = ordinary(cycle, tok, reqs)
    cfg = cycle.cfg
    gib = 12 * 16 * kv_bytes_per_token(cfg, torch.float32, heads=cfg.mtp_heads) / 2 ** 30
    eng = engine(cycle, tok, speculative=True, kv_cache_gib=gib, max_model_len=128)
    assert eng.blocks.num_blocks == 12  # six 60-80-token sequences need more: some are preempted
    preempted = []
    plain = eng.scheduler._preempt
    eng.scheduler._preempt = lambda req, plan: (preempted.append(req.request_id), plain(req, plan))
    got, most = run(eng, reqs)
    assert got == want and preempted and most > 1


def test_drafting_pauses_while_more_requests_run_than_speculative_max_batch(cycle):
    tok = Letters()
    reqs = [(f"p{i}", p, greedy(n), 0) for i, (p, n) in enumerate(zip(prompts(4, CYCLE_V, seed=5), (6, 12, 40, 40)))]
    want = ordinary(cycle, tok, reqs)
    eng = engine(cycle, tok, speculative=True, speculative_max_batch=2)
    for rid, p, params, _ in reqs:
        eng.add_request(p, params, rid)
    got, running_while_drafting = {}, []
    while eng.has_unfinished():
        drafted = any(r.draft_ids for r in eng.scheduler.running)
        if drafted:
            running_while_drafting.append(len(eng.scheduler.running))
        for o in eng.step():
            got.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert {rid: v[0] for rid, v in want.items()} == got
    # Drafts only once two of the four requests had finished, and then on most steps.
    assert running_while_drafting and max(running_while_drafting) <= 2 and eng.spec_stats.verify_steps > 5


def test_logprobs_and_streamed_text_match_ordinary_decoding(cycle):
    tok = Letters()
    params = greedy(25, logprobs=2, stop=[tok.decode([7, 8])])
    [[want]] = engine(cycle, tok).generate([[3, 4, 5]], params)
    eng = engine(cycle, tok, speculative=True)
    rid = eng.add_request([3, 4, 5], params)
    ids, text, lps = [], "", []
    while eng.has_unfinished():
        for o in eng.step():
            ids += o.new_token_ids
            text += o.new_text
            lps += o.new_logprobs
    assert ids == want.token_ids and text == want.text and rid
    assert [lp["token_id"] for lp in lps] == ids
    for a, b in zip(lps, want.logprobs):  # other rows of the same forward: equal up to rounding
        assert abs(a["logprob"] - b["logprob"]) < 1e-4
        assert [t for t, _ in a["top"]] == [t for t, _ in b["top"]]


def test_paged_attention_batches_few_token_sequences_exactly():
    """Verify steps (a few new tokens after a cached context) run batched per token count; every layout must
    equal plain causal attention over each sequence's whole context."""
    from varlen.batch import PagedBatch
    from varlen.model.attention import paged

    g = torch.Generator().manual_seed(0)
    hkv, h, d = 2, 6, 8
    shapes = [(10, 1), (7, 1), (12, 3), (8, 3), (16, 3), (9, 4), (6, 6), (20, 9), (15, 2), (3, 3), (40, 1)]
    total_ctx = sum(c for c, _ in shapes)
    slots = torch.randperm(total_ctx + 5, generator=g)[:total_ctx]  # contexts scattered over the cache
    k_cache = torch.randn(total_ctx + 5, hkv, d, generator=g)
    v_cache = torch.randn(total_ctx + 5, hkv, d, generator=g)
    T = sum(n for _, n in shapes)
    q = torch.randn(T, h, d, generator=g)
    k, v = torch.randn(T, hkv, d, generator=g), torch.randn(T, hkv, d, generator=g)
    new_slots, want, at, qi = [], [], 0, 0
    for ctx, n in shapes:
        ctx_slots = slots[at:at + ctx]
        new_slots.append(ctx_slots[ctx - n:])
        keys = torch.cat([k_cache[ctx_slots[:ctx - n]], k[qi:qi + n]]).repeat_interleave(h // hkv, dim=1)
        values = torch.cat([v_cache[ctx_slots[:ctx - n]], v[qi:qi + n]]).repeat_interleave(h // hkv, dim=1)
        scores = torch.einsum("nhd,chd->hnc", q[qi:qi + n], keys) / math.sqrt(d)
        causal = torch.arange(ctx)[None, :] <= torch.arange(ctx - n, ctx)[:, None]
        want.append(torch.einsum("hnc,chd->nhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), values))
        at, qi = at + ctx, qi + n
    base = Batch.from_seqlens([n for _, n in shapes])
    batch = PagedBatch(base.cu_seqlens, base.positions, base.max_seqlen, context_lens=[c for c, _ in shapes],
                       slot_mapping=torch.cat(new_slots), context_slots=slots, k_cache=k_cache, v_cache=v_cache)
    got = paged.attention(q, k, v, batch)
    plan = batch._plan["paged_plan"]
    assert sorted(n for *_, n in plan["decode"]) == [1, 1, 2, 3, 4]  # 3-token verifies: one group of three
    assert len(plan["prefill"]) == 3                                  # whole prompts and a 9-token chunk
    assert (got - torch.cat(want)).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------------------------ sampling

def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square(df) at the normal quantile z (3.09: p = 0.001), Wilson-Hilferty."""
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: dict, probs: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic of observed counts against exact probabilities, cells with an expected count
    under 5 pooled into one; returns (statistic, degrees of freedom)."""
    cells, pooled_obs, pooled_exp = [], 0, 0.0
    for key, p in probs.items():
        if n * p >= 5:
            cells.append((counts.get(key, 0), n * p))
        else:
            pooled_obs += counts.get(key, 0)
            pooled_exp += n * p
    pooled_obs += sum(c for k, c in counts.items() if k not in probs)
    if pooled_exp > 0:
        cells.append((pooled_obs, max(pooled_exp, 1e-9)))
    return sum((o - e) ** 2 / e for o, e in cells), len(cells) - 1


@functools.lru_cache(maxsize=None)
def toy_dist(context: tuple, vocab: int, salt: int) -> torch.Tensor:
    """A fixed, context-dependent distribution with some exact zeros (as top-k / top-p leave)."""
    g = torch.Generator().manual_seed(hash((context, salt)) % 2 ** 31)
    w = torch.rand(vocab, generator=g) + 0.1
    w[int(torch.randint(0, vocab, (1,), generator=g))] = 0
    return w / w.sum()


def exact_joint(vocab, length, dist):
    """{token tuple: probability} of the first `length` tokens, dist(context) giving each next-token distribution."""
    out = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for c, p in out.items():
            d = dist(c).tolist()
            nxt.update({c + (t,): p * d[t] for t in range(vocab)})
        out = nxt
    return {c: p for c, p in out.items() if p > 0}


def speculative_samples(n, vocab, k, verify, seed=0):
    """First k + 1 tokens of n sequences: k drafts from q (each draft's q depends only on the verified
    context, like the heads'), verified against p; then whatever remains is drawn from p."""
    p_of = lambda c: toy_dist(c, vocab, 1)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    counts: dict = {}
    for _ in range(n):
        ctx = ()
        while len(ctx) < k + 1:
            d = k + 1 - len(ctx) - 1
            q_rows = torch.stack([toy_dist(ctx + (j,), vocab, 2) for j in range(d)]) if d else torch.empty(0, vocab)
            drafts = [int(torch.multinomial(q, 1, generator=g)) for q in q_rows]
            p_rows = torch.stack([p_of(ctx + tuple(drafts[:i])) for i in range(d + 1)])
            ctx += tuple(verify(p_rows, q_rows, drafts, g))
        key = ctx[:k + 1]
        counts[key] = counts.get(key, 0) + 1
    return counts, exact_joint(vocab, k + 1, p_of)


def test_verify_sampling_follows_p_exactly_and_the_test_catches_a_biased_verifier():
    n, vocab, k = 6000, 4, 2
    counts, probs = speculative_samples(n, vocab, k, verify_sampling)
    stat, df = chi_square(counts, probs, n)
    assert stat < chi_square_critical(df), (stat, df)

    def accept_everything(p_rows, q_rows, drafts, g):  # the classic mistake: keep drafts without the ratio test
        return drafts + [int(torch.multinomial(p_rows[len(drafts)], 1, generator=g))]
    counts, _ = speculative_samples(n, vocab, k, accept_everything)
    stat, df = chi_square(counts, probs, n)
    assert stat > 3 * chi_square_critical(df), (stat, df)


def test_verify_greedy_keeps_the_matching_prefix_and_adds_the_models_token():
    rows = F.one_hot(torch.tensor([3, 1, 4, 1]), 6).float()  # argmax 3, then 1, then 4, then 1
    assert verify_greedy(rows, [3, 1, 4]) == [3, 1, 4, 1]
    assert verify_greedy(rows, [3, 2, 4]) == [3, 1]
    assert verify_greedy(rows, [0, 1, 4]) == [3]
    assert verify_greedy(rows[:1], []) == [3]
    assert accept(rows, [3, 5], None, SamplingParams(temperature=0), None) == [3, 1]


TINY_V = 6


@pytest.fixture(scope="module")
def tiny_vocab():
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=TINY_V, dim=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=32, mtp_heads=2,
                      tie_embeddings=False)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(8)  # broad but far from uniform: about half the drafts are accepted
    return m


def test_speculative_sampling_in_the_engine_follows_the_models_distribution(tiny_vocab):
    """The first three tokens of 3,000 seeded requests: their joint distribution is the model's own, computed
    exactly by running the model on every prefix, although the random heads' drafts are often rejected."""
    n, prompt = 3000, [2, 3, 4]
    # max_tokens 4: the first token comes with 2 drafts, so both heads' drafts are verified.
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=s, ignore_eos=True) for s in range(n)]
    eng = engine(tiny_vocab, Letters(), speculative=True, max_num_seqs=512, max_num_batched_tokens=4096,
                 max_waiting=n)
    counts: dict = {}
    for i, p in enumerate(params):
        eng.add_request(prompt, p, f"s{i}")
    outs: dict = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.request_id, []).extend(o.new_token_ids)
    for ids in outs.values():
        counts[tuple(ids[:3])] = counts.get(tuple(ids[:3]), 0) + 1
    s = eng.spec_stats
    assert 0.2 < s.acceptance[0] < 0.9 and s.drafted[1] > 1000, s.acceptance  # both paths taken often

    @torch.no_grad()
    def dist(ctx):
        ids = torch.tensor(prompt + list(ctx))
        return tiny_vocab(ids, Batch.from_seqlens([len(ids)]))[-1].float().softmax(-1)
    probs = exact_joint(TINY_V, 3, dist)
    stat, df = chi_square(counts, probs, n)
    assert stat < chi_square_critical(df), (stat, df)


def test_seeded_speculative_sampling_does_not_depend_on_the_batch(cycle):
    tok = Letters()
    ps = prompts(5, CYCLE_V, seed=5)
    params = SamplingParams(max_tokens=15, temperature=1.0, top_k=10, top_p=0.95, seed=7, ignore_eos=True)
    alone = [engine(cycle, tok, speculative=True).generate([p], params)[0][0].token_ids for p in ps]
    eng = engine(cycle, tok, speculative=True)
    assert [c.token_ids for [c] in eng.generate(ps, params)] == alone
    assert eng.spec_stats.acceptance[0] > 0.3


# ------------------------------------------------------------------------------------------------ blocks

def fake_spec_step(sched: Scheduler, rng: random.Random, vocab: int, k: int) -> None:
    """What the engine does after a forward, with random drafts, random accept counts and random tokens."""
    plan = sched.schedule()
    bs = sched.blocks.block_size
    for req, n in plan.scheduled:
        start, end = req.num_computed, req.num_computed + n
        assert len(req.block_table) * bs >= end, "token without a slot"
        if end < req.num_tokens:
            sched.commit(req, end)
            continue
        drafts = req.draft_ids[:end - req.num_tokens]
        assert start == req.num_tokens - 1 or not drafts
        accepted = rng.randint(0, len(drafts))
        tokens = drafts[:accepted] + [rng.randrange(vocab)]
        reason = None
        for t in tokens:
            req.output_ids.append(t)
            if len(req.output_ids) >= req.params.max_tokens or rng.random() < 0.03:  # length, or a stop
                reason = "stop"
                break
        sched.commit(req, min(end - (len(drafts) - accepted), req.num_tokens))
        if reason:
            sched.finish(req, reason)
        else:
            assert len(req.block_table) <= sched.blocks.blocks_for(req.num_tokens), "a rejected draft's block kept"
            req.draft_ids = [rng.randrange(vocab) for _ in range(rng.randint(0, k))]
    assert plan.num_tokens <= sched.budget


def check_prefix_cache(blocks: BlockManager, live: list[Request]) -> None:
    """Every block registered in the prefix cache holds the request's own (accepted) tokens."""
    for r in live:
        ids = r.all_ids
        bs = blocks.block_size
        for b in range(blocks.hashed_upto.get(r.request_id, 0)):
            assert blocks.block_tokens[r.block_table[b]] == tuple(ids[b * bs:(b + 1) * bs])


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(1, 64), max_seqs=st.integers(1, 6), caching=st.booleans(), k=st.integers(1, 4))
def test_no_block_leaked_with_random_drafts_and_accept_patterns(ops, num_blocks, block_size, budget, max_seqs,
                                                                caching, k):
    blocks = BlockManager(num_blocks, block_size, caching)

    def check(running: list[Request], live: list[Request]) -> None:
        check_prefix_cache(blocks, running)
        assert all(not r.draft_ids for r in live if r.status is Status.WAITING)

    run_traffic(ops, blocks, Scheduler(blocks, max_seqs, budget),
                lambda sched, rng: fake_spec_step(sched, rng, vocab=6, k=k), check)


def test_truncate_returns_draft_blocks_first_in_line():
    blocks = BlockManager(8, 4)
    r = Request("r", list(range(6)), SamplingParams())
    blocks.allocate(r)
    blocks.append(r, 6 + 7)  # room for 7 drafts: 4 blocks
    assert len(r.block_table) == 4
    extra = r.block_table[2:]
    blocks.truncate(r, 8)
    assert len(r.block_table) == 2 and blocks.num_free_blocks == 6
    assert list(blocks.free)[:2] == extra  # handed out again before blocks that may hold a cached prefix
    blocks.check([r])


# ------------------------------------------------------------------------------------------------ errors, metrics, CLI

def test_speculative_needs_heads_and_at_most_one_draft_per_head(tokenizer):
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**{**CFG.__dict__, "mtp_heads": 0})).eval()
    with pytest.raises(ConfigError) as e:
        engine(plain, tokenizer, speculative=True)
    msg = str(e.value)
    assert "--speculative" in msg and "--model.mtp_heads 3" in msg and "--train.freeze_trunk" in msg
    with pytest.raises(ConfigError, match="--num-speculative is 4.*3 MTP heads"):
        engine(Transformer(CFG), tokenizer, speculative=True, num_speculative=4)
    # Only the heads that draft run; block heads keep a cache layer each, mlp heads none.
    eng = engine(Transformer(CFG), tokenizer, speculative=True, num_speculative=2)
    assert eng.num_speculative == 2 and len(eng.runner.k_cache) == CFG.n_layer + 2
    eng = engine(Transformer(ModelConfig(**{**CFG.__dict__, "mtp_head": "mlp"})), tokenizer, speculative=True)
    assert eng.num_speculative == 3 and len(eng.runner.k_cache) == CFG.n_layer


def test_metrics_report_acceptance_per_head():
    s = SpecStats(3)
    s.record(3, 1)  # head 1 right, head 2 wrong, head 3 not reached
    s.record(2, 2)
    s.record(0, 0)  # no drafts: not a verify step
    assert s.drafted == [2, 2, 1] and s.accepted == [2, 1, 0] and s.verify_steps == 2
    assert s.acceptance == [1.0, 0.5, 0.0] and s.tokens_per_step == 2.5
    from prometheus_client import CollectorRegistry, generate_latest

    class Spec:
        def collect(self):
            return speculative_metrics(s)

    registry = CollectorRegistry()
    registry.register(Spec())
    text = generate_latest(registry).decode()
    assert 'varlen_spec_acceptance_rate{head="2"} 0.5' in text
    assert 'varlen_spec_accepted_tokens_total{head="1"} 2.0' in text
    assert "varlen_spec_tokens_per_step 2.5" in text


def test_cli_sample_and_serve_speculative(tmp_path, sharp, tokenizer, capsys):
    from varlen.checkpoint.hf_llama import save_varlen
    from varlen.cli import main as cli_main
    from varlen.config import Config

    ckpt = save_varlen(sharp, Config(model=CFG), tokenizer, tmp_path / "heads")
    args = ["sample", str(ckpt), "--prompt", "import os", "--max-new-tokens", "12", "--temperature", "0",
            "--dtype", "float32"]  # the same text token for token: exact in float32
    assert cli_main(args) == 0
    plain = capsys.readouterr().out
    assert cli_main(args + ["--speculative"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "drafts accepted per head" in out.err

    no_heads = Config(model=ModelConfig(**{**CFG.__dict__, "mtp_heads": 0}))
    plain_ckpt = save_varlen(Transformer(no_heads.model), no_heads, tokenizer, tmp_path / "plain")
    assert cli_main(["serve", str(plain_ckpt), "--speculative", "--port", "1"]) == 2  # refused before listening
    assert "--model.mtp_heads 3" in capsys.readouterr().err
    assert cli_main(["serve", str(ckpt), "--num-speculative", "2", "--port", "1"]) == 2
    assert "--num-speculative needs --speculative" in capsys.readouterr().err
    assert cli_main(["serve", str(ckpt), "--speculative-max-batch", "4", "--port", "1"]) == 2
    assert "--speculative-max-batch needs --speculative" in capsys.readouterr().err
