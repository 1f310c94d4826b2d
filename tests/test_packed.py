"""Prepacked (oneDNN) dense weights for CPU serving: the same results as F.linear, through casts and copies."""
import copy

import pytest
import torch
import torch.nn.functional as F

from varlen.batch import Batch
from varlen.config import ModelConfig
from varlen.model.packed import PackedLinear, pack_linears_, packing_available
from varlen.model.transformer import Transformer

pytestmark = pytest.mark.skipif(not packing_available(torch.device("cpu")),
                                reason="this torch build has no oneDNN linear prepacking")


@pytest.mark.parametrize("shape", [(1, 64), (3, 64), (65, 64), (2, 5, 64)])
def test_packed_linear_equals_f_linear_in_fp32_and_bf16(shape):
    torch.manual_seed(0)
    w, x = torch.randn(96, 64), torch.randn(*shape)
    with torch.no_grad():
        assert torch.allclose(PackedLinear(w)(x), F.linear(x, w), atol=1e-5)
        got = PackedLinear(w.bfloat16())(x.bfloat16())
    assert got.dtype == torch.bfloat16 and got.shape == (*shape[:-1], 96)
    assert torch.allclose(got.float(), F.linear(x.bfloat16(), w.bfloat16()).float(), atol=2e-2, rtol=1e-2)


def test_packed_linear_casts_copies_and_refuses_a_mismatched_input():
    torch.manual_seed(0)
    w, x = torch.randn(32, 16), torch.randn(4, 16)
    lin = PackedLinear(w)
    twin = copy.deepcopy(lin)
    assert torch.equal(twin.weight(), w) and twin.packed is not lin.packed
    lin.to(torch.bfloat16)
    assert lin.dtype == torch.bfloat16 and torch.equal(lin.weight(), w.bfloat16())
    with torch.no_grad():
        assert torch.allclose(lin(x.bfloat16()).float(), F.linear(x.bfloat16(), w.bfloat16()).float(), atol=2e-2)
        with pytest.raises(TypeError, match="bfloat16 weights, got torch.float32"):
            lin(x)
        assert torch.allclose(twin(x), F.linear(x, w), atol=1e-5)  # the copy kept its own fp32 weight


@pytest.mark.parametrize("tied", [True, False])
def test_a_packed_model_gives_the_logits_of_the_plain_one(tied):
    cfg = ModelConfig(vocab_size=200, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64,
                      tie_embeddings=tied, mtp_heads=2, attention="sdpa_docs")
    torch.manual_seed(0)
    plain = Transformer(cfg).eval()
    packed = copy.deepcopy(plain).fuse_projections_()
    n = pack_linears_(packed)
    # 2 layers x (qkv, o, gate_up, down) + 2 heads x the same + the vocab projection
    assert n == 4 * (cfg.n_layer + cfg.mtp_heads) + 1
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules() if m is not packed.lm_head)
    ids = torch.randint(0, cfg.vocab_size, (20,))
    batch = Batch.from_seqlens([12, 8])
    with torch.no_grad():
        want_base, want_heads = plain(ids, batch, heads=True)
        got_base, got_heads = packed(ids, batch, heads=True)
    for got, want in zip([got_base, *got_heads], [want_base, *want_heads]):
        assert torch.allclose(got, want, atol=1e-4)


def test_a_packed_model_saves_and_loads_the_plain_state_dict():
    cfg = ModelConfig(vocab_size=100, dim=32, n_layer=1, n_head=2, n_kv_head=1, max_seq_len=32, tie_embeddings=False)
    torch.manual_seed(0)
    plain = Transformer(cfg)
    want = {k: v.clone() for k, v in plain.state_dict().items()}
    packed = copy.deepcopy(plain).fuse_projections_()
    pack_linears_(packed)
    got = packed.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    torch.manual_seed(1)
    other = Transformer(cfg).fuse_projections_()
    pack_linears_(other)
    other.load_state_dict(want)
    assert all(torch.equal(v, want[k]) for k, v in other.state_dict().items())


def test_serving_packs_bf16_weights_and_leaves_fp32_ones_as_transformers_runs_them():
    from varlen.precision import prepare_model
    cfg = ModelConfig(vocab_size=100, dim=32, n_layer=1, n_head=2, n_kv_head=1, max_seq_len=32)
    for dtype, packed in (("bfloat16", True), ("float32", False)):
        model = Transformer(cfg).fuse_projections_()
        choice = prepare_model(model, dtype)
        assert any(isinstance(m, PackedLinear) for m in model.modules()) == packed, dtype
        assert ("prepacked" in choice.reason) == packed
