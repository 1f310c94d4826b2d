"""A packed forward is exactly the documents run one by one, on every backend this CPU can run."""
import pytest
import torch

from varlen.batch import Batch
from varlen.config import ModelConfig
from varlen.model.transformer import Transformer

LENS = [7, 33, 1, 33, 64, 2, 19]  # equal lengths share an SDPA call; a 1-token document is legal
CONFIGS = {
    "gqa_tied": ModelConfig(vocab_size=300, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64),
    "mha_untied_theta": ModelConfig(vocab_size=300, dim=48, n_layer=2, n_head=3, n_kv_head=3, max_seq_len=64,
                                    tie_embeddings=False, rope_theta=50000.0),
}


def make(cfg, backend):
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.attention_backend = backend
    return model


def run_alone(model, ids, lens):
    """Each document in its own forward, with the reference backend, concatenated."""
    backend, model.attention_backend = model.attention_backend, "reference"
    outs, off = [], 0
    for n in lens:
        outs.append(model(ids[off:off + n], Batch.from_seqlens([n])))
        off += n
    model.attention_backend = backend
    return torch.cat(outs)


@pytest.mark.parametrize("lens", [LENS, [12] * 4], ids=["mixed", "one_length"])  # one length: no permutation
@pytest.mark.parametrize("cfg_name", list(CONFIGS))
@pytest.mark.parametrize("backend", ["sdpa_docs", "reference"])
def test_packed_forward_and_grads_equal_documents_alone(cfg_name, backend, lens):
    cfg = CONFIGS[cfg_name]
    model = make(cfg, backend)
    ids = torch.randint(0, cfg.vocab_size, (sum(lens),), generator=torch.Generator().manual_seed(1))
    weights = torch.randn(sum(lens), cfg.vocab_size, generator=torch.Generator().manual_seed(2))

    packed = model(ids, Batch.from_seqlens(lens))
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone = run_alone(model, ids, lens)
    (alone * weights).sum().backward()

    assert (packed - alone).abs().max().item() <= 1e-5
    for name, p in model.named_parameters():
        scale = max(p.grad.abs().max().item(), 1.0)
        assert (packed_grads[name] - p.grad).abs().max().item() <= 1e-5 * scale, name


def test_flex_attention_forward_matches_on_cpu():
    """FlexAttention has no backward on CPU (torch raises); its forward must still be exact here."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    cfg = CONFIGS["gqa_tied"]
    model = make(cfg, "flex")
    ids = torch.randint(0, cfg.vocab_size, (sum(LENS),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        packed = model(ids, Batch.from_seqlens(LENS))
        alone = run_alone(model, ids, LENS)
    assert (packed - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa_docs", "reference"])
def test_changing_one_document_leaves_the_others_unchanged(backend):
    cfg = CONFIGS["gqa_tied"]
    model = make(cfg, backend)
    ids = torch.randint(0, cfg.vocab_size, (sum(LENS),), generator=torch.Generator().manual_seed(4))
    batch = Batch.from_seqlens(LENS)
    with torch.no_grad():
        before = model(ids, batch)
        changed = ids.clone()
        a0, a1 = 7, 7 + 33  # document A is the second one
        changed[a0:a1] = (changed[a0:a1] + 1) % cfg.vocab_size
        after = model(changed, batch)
    assert not torch.allclose(before[a0:a1], after[a0:a1])
    assert torch.equal(before[:a0], after[:a0])
    assert torch.equal(before[a1:], after[a1:])


def test_positions_restart_so_a_document_is_shift_invariant():
    """The same document at the front or the back of a row gives the same logits."""
    cfg = CONFIGS["gqa_tied"]
    model = make(cfg, "sdpa_docs")
    doc = torch.randint(0, cfg.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    other = torch.randint(0, cfg.vocab_size, (30,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        front = model(torch.cat([doc, other]), Batch.from_seqlens([20, 30]))[:20]
        back = model(torch.cat([other, doc]), Batch.from_seqlens([30, 20]))[30:]
    assert (front - back).abs().max().item() <= 1e-5


def test_auto_backend_on_cpu_is_the_trainable_one():
    from varlen.model.attention import choose_backend
    assert choose_backend("auto", torch.device("cpu")) == "sdpa_docs"
    with pytest.raises(ValueError, match="flash"):
        choose_backend("flash", torch.device("cpu"))


@pytest.mark.parametrize("seqlens", [[37], [5, 5, 9, 3], [6, 6, 6]])
def test_sdpa_docs_calls_sdpa_with_4d_tensors(monkeypatch, seqlens):
    # With 3-D inputs CPU SDPA takes the math path, which builds the (T, T) scores and is ~5x slower.
    from varlen.model.attention import sdpa_docs
    seen = []
    real = sdpa_docs.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q.dim())
        return real(q, k, v, **kw)
    monkeypatch.setattr(sdpa_docs.F, "scaled_dot_product_attention", spy)
    T = sum(seqlens)
    q, k, v = torch.randn(T, 4, 8), torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    sdpa_docs.attention(q, k, v, Batch.from_seqlens(seqlens))
    assert seen and set(seen) == {4}
