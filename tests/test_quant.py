"""Serving-time model transforms: fused projections give the same logits; weight-only int8 stays close."""
import pytest
import torch

from varlen.batch import Batch
from varlen.config import ModelConfig
from varlen.model.quant import Int8Linear, int8_kernel_available, quantize_int8_, quantize_weight
from varlen.model.transformer import Transformer

CFG = ModelConfig(vocab_size=320, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=256, mtp_heads=2)
needs_kernel = pytest.mark.skipif(not int8_kernel_available(torch.device("cpu")),
                                  reason="torch._weight_int8pack_mm is missing from this PyTorch")


def model_and_batch(seed=0):
    torch.manual_seed(seed)
    m = Transformer(CFG).eval()
    ids = torch.randint(0, CFG.vocab_size, (40,))
    return m, ids, Batch.from_seqlens([25, 15])


def test_fused_projections_give_the_same_logits_and_head_logits():
    m, ids, b = model_and_batch()
    with torch.no_grad():
        want = m.logits_with_heads(ids, b)
        m.fuse_projections_()
        got = m.logits_with_heads(ids, b)
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert all(torch.allclose(g, w, atol=1e-5) for g, w in zip(got[1], want[1]))
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name, _ in m.named_parameters())


def test_quantized_weight_round_trips_within_half_a_step():
    w = torch.randn(48, 32)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int8_linear_matches_its_dequantized_weight_and_picks_the_dense_path_for_many_rows(rows):
    lin = torch.nn.Linear(64, 96, bias=False)
    q = Int8Linear(lin, max_int8_rows=4)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        out = q(x)
        deq = torch.nn.functional.linear(x, q.qweight.float() * q.scales.float()[:, None])
        dense = lin(x)
    if rows <= 4:  # int8 weights, bf16 activations
        assert torch.allclose(out, deq, atol=0.05, rtol=0.02) and not torch.allclose(out, dense, atol=1e-5)
    else:  # the fp32 weight (prepacked where oneDNN is there: equal up to summation order)
        assert torch.allclose(out, dense, atol=1e-5) and not torch.allclose(out, deq, atol=1e-3)


@needs_kernel
def test_int8_model_stays_close_to_the_float_model():
    m, ids, b = model_and_batch(1)
    with torch.no_grad():
        m.embed_tokens.weight.mul_(20)  # sharp logits: argmax is not decided by rounding
        want = m(ids, b)
        m.fuse_projections_()
        quantize_int8_(m, max_int8_rows=64)
        got = m(ids, b)
    assert isinstance(m.output_proj.proj, Int8Linear)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert (got - want).abs().max() < 0.1 * want.abs().max()
