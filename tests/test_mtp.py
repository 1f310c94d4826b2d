"""Multi-token-prediction heads: targets stay inside a document, base logits stay bitwise, heads train (also on
a frozen trunk), and checkpoints / HF exports carry them in their own file."""
import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from varlen.batch import Batch
from varlen.checkpoint import hf_llama, io, load_model
from varlen.cli import main as cli_main
from varlen.config import Config, ConfigError, ModelConfig, load_config
from varlen.data.corpus import stdlib_files
from varlen.data.loader import IGNORE, MicroBatch
from varlen.data.tokenizer import train_tokenizer
from varlen.model import mtp
from varlen.model.mtp import head_targets, load_with_heads
from varlen.model.transformer import Transformer
from varlen.train.loop import loss_sum

from .helpers import TINY, python_corpus

CFG = ModelConfig(vocab_size=300, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=64, mtp_heads=2)
NO_AMP = torch.autocast("cpu", enabled=False)


def model_with_heads(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


# ------------------------------------------------------------------------------------------------ targets

def test_head_targets_mask_exactly_the_positions_whose_token_is_in_the_next_sequence():
    # Three sequences of 4, 2 and 5 tokens; the last position is padding (IGNORE), as PadLoader makes it.
    targets = torch.tensor([10, 11, 12, 13, 20, 21, 30, 31, 32, 33, IGNORE])
    cu = Batch.from_seqlens([4, 2, 5]).cu_seqlens
    X = IGNORE
    assert head_targets(targets, cu, 1).tolist() == [11, 12, 13, X, 21, X, 31, 32, 33, X, X]
    assert head_targets(targets, cu, 2).tolist() == [12, 13, X, X, X, X, 32, 33, X, X, X]
    assert torch.equal(head_targets(targets, cu, 0), targets)


def test_head_targets_match_a_position_by_position_reference():
    rng = random.Random(0)
    for _ in range(50):
        lens = [rng.randint(1, 9) for _ in range(rng.randint(1, 5))]
        targets = torch.tensor([rng.choice([IGNORE, rng.randint(0, 99)]) for _ in range(sum(lens))])
        cu = Batch.from_seqlens(lens).cu_seqlens.tolist()
        for j in (1, 2, 3):
            want = []
            for s, e in zip(cu, cu[1:]):
                for p in range(s, e):
                    ok = p + j < e and targets[p] != IGNORE
                    want.append(int(targets[p + j]) if ok else IGNORE)
            assert head_targets(targets, torch.tensor(cu), j).tolist() == want, (lens, j)


def test_ignore_is_the_loaders():
    assert mtp.IGNORE == IGNORE


# ------------------------------------------------------------------------------------------------ model

def test_heads_leave_the_base_logits_bitwise_and_give_one_logits_tensor_per_head():
    model = model_with_heads()
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**{**CFG.__dict__, "mtp_heads": 0})).eval()
    # The heads are built after the trunk, so one seed gives the same trunk with or without them.
    for k, v in plain.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    ids = torch.randint(0, CFG.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    batch = Batch.from_seqlens([13, 1, 26])
    with torch.no_grad():
        base, heads = model(ids, batch, heads=True)
        assert torch.equal(base, plain(ids, batch))
        assert torch.equal(model(ids, batch), base)
        assert [h.shape for h in heads] == [(40, CFG.vocab_size)] * 2
        rows = torch.tensor([12, 13, 39])
        base_r, heads_r = model(ids, batch, rows, heads=True)
    # A vocab projection of fewer rows may round differently (BLAS blocking), hence the tolerance.
    for full, picked in zip([base, *heads], [base_r, *heads_r]):
        assert (full[rows] - picked).abs().max().item() <= 1e-6
    assert not torch.allclose(heads[0], heads[1])  # heads are separate blocks, not copies


def test_head_loss_of_a_document_ignores_its_neighbours():
    """Per-document attention and boundary masking: changing the next document (whose first tokens would be
    the crossing targets) leaves every head's loss on this one bitwise unchanged."""
    model = model_with_heads()
    lens = [20, 15, 9]
    docs = [torch.randint(0, CFG.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(n)) for n in lens]
    a1, b1 = lens[0], lens[0] + lens[1]

    def per_doc_head_losses(docs):
        micro = MicroBatch(torch.cat([d[:-1] for d in docs]), torch.cat([d[1:] for d in docs]),
                           Batch.from_seqlens(lens))
        with torch.no_grad():
            _, heads = model(micro.ids, micro.batch, heads=True)
        out = []
        for j, logits in enumerate(heads, start=1):
            t = head_targets(micro.targets, micro.batch.cu_seqlens, j)
            out.append([F.cross_entropy(logits[s:e], t[s:e], reduction="sum") for s, e in
                        ((0, a1), (a1, b1), (b1, sum(lens)))])
        return out

    before = per_doc_head_losses(docs)
    after = per_doc_head_losses([docs[0], (docs[1] + 1) % CFG.vocab_size, docs[2]])
    for j in range(2):
        assert torch.equal(before[j][0], after[j][0])  # A: its last targets would be B's first without masking
        assert not torch.equal(before[j][1], after[j][1])
        assert torch.equal(before[j][2], after[j][2])


def test_loss_sum_adds_weighted_head_losses_and_is_unchanged_without_heads():
    lens = [12, 30, 5]
    docs = [torch.randint(0, CFG.vocab_size, (n + 1,), generator=torch.Generator().manual_seed(n)) for n in lens]
    micro = MicroBatch(torch.cat([d[:-1] for d in docs]), torch.cat([d[1:] for d in docs]), Batch.from_seqlens(lens))
    torch.manual_seed(0)
    plain = Transformer(ModelConfig(**{**CFG.__dict__, "mtp_heads": 0}))
    assert torch.equal(loss_sum(plain, micro, NO_AMP), loss_sum(plain, micro, NO_AMP, 0.3))

    model = model_with_heads().train()
    base = loss_sum(model, micro, NO_AMP)
    _, heads = model(micro.ids, micro.batch, heads=True)
    want = base + 0.5 * sum(F.cross_entropy(h, head_targets(micro.targets, micro.batch.cu_seqlens, j),
                                            reduction="sum") for j, h in enumerate(heads, start=1))
    got = loss_sum(model, micro, NO_AMP, 0.5)
    assert abs(got.item() - want.item()) <= 1e-4
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "mtp." in n)


def test_missing_heads_start_as_copies_of_the_last_layer_and_present_ones_are_kept():
    model = model_with_heads(seed=3)
    trained_head_1 = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("mtp.blocks.0.")}
    state = {k: v for k, v in model_with_heads(seed=4).state_dict().items() if not k.startswith("mtp.blocks.1.")}
    state.update(trained_head_1)
    assert load_with_heads(model, state) == [2]
    last = model.layers[-1].state_dict()
    assert all(torch.equal(v, last[k]) for k, v in model.mtp.blocks[1].state_dict().items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained_head_1.items())
    with pytest.raises(ValueError, match="trunk"):
        load_with_heads(model, {k: v for k, v in state.items() if k != "norm.weight"})


def test_mlp_heads_have_no_attention_and_start_as_the_last_layers_mlp():
    model = model_with_heads(ModelConfig(**{**CFG.__dict__, "mtp_head": "mlp"}), seed=3)
    keys = set(model.mtp.blocks[0].state_dict())
    assert keys == {"post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                    "mlp.down_proj.weight"} and not model.mtp.attends
    trunk = {k: v for k, v in model_with_heads(CFG, seed=4).state_dict().items() if not k.startswith("mtp.")}
    assert load_with_heads(model, trunk) == [1, 2]
    last = model.layers[-1].state_dict()
    assert all(torch.equal(v, last[k]) for b in model.mtp.blocks for k, v in b.state_dict().items())


@pytest.mark.parametrize("kind", ["block", "mlp"])
def test_serving_draft_logits_equal_the_training_head_logits(kind):
    """The serving split (base logits and draft states at some rows, then draft_logits on the rows a request
    drafts from) gives the head logits training computes, for the first num_heads heads."""
    model = model_with_heads(ModelConfig(**{**CFG.__dict__, "mtp_head": kind}), seed=5)
    ids, batch = torch.randint(0, CFG.vocab_size, (30,)), Batch.from_seqlens([12, 18])
    rows = torch.tensor([3, 11, 29])
    with torch.no_grad():
        want_base, want_heads = model(ids, batch, rows, heads=True)
        for num in (1, 2):
            base, states = model.logits_and_draft_states(ids, batch, rows, num)
            assert states.shape[:2] == (3, num if kind == "block" else 1)
            got = model.draft_logits(states, num)
            assert torch.allclose(base, want_base, atol=1e-5) and got.shape == (3, num, CFG.vocab_size)
            for j in range(num):
                assert torch.allclose(got[:, j], want_heads[j], atol=1e-5), (kind, num, j)


# ------------------------------------------------------------------------------------------------ training

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return python_corpus(tmp_path_factory.mktemp("mtp") / "corpus", n_files=30)


def train(corpus, out, *extra):
    assert cli_main(["train", "--corpus", str(corpus), "--data.glob", "*.py", "--out", str(out), "--no-progress",
                     *TINY, *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["block", "mlp"])
def test_training_with_heads_lowers_their_validation_losses(corpus, tmp_path, kind):
    rows = train(corpus, tmp_path / "run", "--model.mtp_heads", "2", "--model.mtp_head", kind,
                 "--train.max_steps", "8", "--train.eval_every", "1")
    # `loss` is the next-token part of what the optimizer minimises (loss_with_heads adds 0.3 x head losses).
    assert all(r["loss_with_heads"] > r["loss"] + 0.3 * 2 * 3 for r in rows)
    first, last = rows[0]["val_loss_heads"], rows[-1]["val_loss_heads"]
    assert len(first) == 2 and all(b < a - 0.3 for a, b in zip(first, last)), (first, last)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000008"
    assert not any(k.startswith("mtp.") for k in load_file(str(ckpt / "model.safetensors")))
    per_head = 9 if kind == "block" else 4  # an mlp head: its norm and the three MLP matrices
    assert len(load_file(str(ckpt / io.MTP_WEIGHTS))) == 2 * per_head


def test_frozen_trunk_stays_bitwise_while_heads_train(corpus, tmp_path):
    train(corpus, tmp_path / "base", "--train.max_steps", "3", "--train.eval_every", "0")
    base, _, _ = load_model(tmp_path / "base")
    assert base.mtp is None
    rows = train(corpus, tmp_path / "heads", "--init-from", str(tmp_path / "base"), "--model.mtp_heads", "2",
                 "--train.freeze_trunk", "true", "--train.max_steps", "4", "--train.eval_every", "2")
    model, cfg, _ = load_model(tmp_path / "heads")
    assert cfg.model.mtp_heads == 2 and cfg.train.freeze_trunk
    start = base.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("mtp."):
            assert torch.equal(v, start[k]), k
    last_layer = base.layers[-1].state_dict()
    for block in model.mtp.blocks:  # each started as the last layer and every matrix has moved
        for k, v in block.state_dict().items():
            assert v.dim() < 2 or not torch.equal(v, last_layer[k]), k
    assert len({r["val_loss"] for r in rows if "val_loss" in r}) == 1  # base predictions never changed


def test_init_from_heads_of_another_kind_is_refused_and_dropping_heads_is_said(corpus, tmp_path, capsys):
    tok = train_tokenizer([p.read_text(errors="replace") for p in sorted(corpus.glob("*.py"))], 300)
    cfg = Config(model=ModelConfig(**{**CFG.__dict__, "vocab_size": tok.vocab_size, "mtp_head": "mlp"}))
    hf_llama.save_varlen(model_with_heads(cfg.model), cfg, tok, tmp_path / "init")
    args = ["train", "--corpus", str(corpus), "--data.glob", "*.py", "--no-progress", *TINY,
            "--init-from", str(tmp_path / "init"), "--train.max_steps", "1", "--train.eval_every", "0"]
    assert cli_main([*args, "--out", str(tmp_path / "a"), "--model.mtp_heads", "2"]) == 2
    err = capsys.readouterr().err
    assert "has mlp MTP heads" in err and "pass --model.mtp_head mlp" in err
    assert cli_main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "has 2 MTP heads; this run keeps 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ checkpoints

@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([p.read_text(errors="replace") for p in stdlib_files()[:40]], 320)


def head_logits(model, ids, batch):
    with torch.no_grad():
        return model(ids, batch, heads=True)


def assert_same_outputs(a, b):
    assert torch.equal(a[0], b[0]) and len(a[1]) == len(b[1])
    assert all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.parametrize("kind", ["block", "mlp"])
def test_varlen_checkpoint_keeps_heads_in_their_own_file(tmp_path, tokenizer, kind):
    cfg = Config(model=ModelConfig(**{**CFG.__dict__, "vocab_size": tokenizer.vocab_size, "mtp_head": kind}))
    model = model_with_heads(cfg.model)
    hf_llama.save_varlen(model, cfg, tokenizer, tmp_path / "ckpt")
    assert set(load_file(str(tmp_path / "ckpt" / io.MTP_WEIGHTS))) == {k for k in model.state_dict()
                                                                        if k.startswith("mtp.")}
    back, cfg2, _ = load_model(tmp_path / "ckpt")
    assert (cfg2.model.mtp_heads, cfg2.model.mtp_head) == (2, kind)
    ids, batch = torch.randint(0, tokenizer.vocab_size, (30,)), Batch.from_seqlens([10, 20])
    assert_same_outputs(head_logits(model, ids, batch), head_logits(back, ids, batch))

    (tmp_path / "ckpt" / io.MTP_WEIGHTS).unlink()
    with pytest.raises(io.CheckpointError, match="mtp_heads.safetensors is missing"):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("kind", ["block", "mlp"])
def test_hf_export_loads_in_transformers_as_the_base_model_and_reimports_the_heads(tmp_path, tokenizer, kind):
    transformers = pytest.importorskip("transformers")
    cfg = Config(model=ModelConfig(**{**CFG.__dict__, "vocab_size": tokenizer.vocab_size, "tie_embeddings": False,
                                      "mtp_head": kind}))
    model = model_with_heads(cfg.model)
    hf_llama.save_hf(model, cfg, tokenizer, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (written["varlen_mtp_heads"], written["varlen_mtp_head"]) == (2, kind)
    assert not any(k.startswith("mtp.") for k in load_file(str(tmp_path / "hf" / "model.safetensors")))

    hf, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    docs = [torch.randint(0, tokenizer.vocab_size, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 23)]
    ids, batch = torch.cat(docs), Batch.from_seqlens([9, 23])
    with torch.no_grad():
        theirs = torch.cat([hf.eval()(input_ids=d[None]).logits[0] for d in docs])
    assert (model(ids, batch) - theirs).abs().max().item() <= 1e-4

    back, cfg2, _ = load_model(tmp_path / "hf")
    assert (cfg2.model.mtp_heads, cfg2.model.mtp_head) == (2, kind)
    assert_same_outputs(head_logits(model, ids, batch), head_logits(back, ids, batch))

    plain_cfg = Config(model=ModelConfig(**{**cfg.model.__dict__, "mtp_heads": 0}))
    hf_llama.save_hf(Transformer(plain_cfg.model), plain_cfg, tokenizer, tmp_path / "plain")
    assert not (tmp_path / "plain" / io.MTP_WEIGHTS).exists()
    assert "varlen_mtp_heads" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    assert load_model(tmp_path / "plain")[0].mtp is None


# ------------------------------------------------------------------------------------------------ config

@pytest.mark.parametrize("overrides, needles", [
    ({"train.freeze_trunk": "true"}, ["train.freeze_trunk", "model.mtp_heads is 0", "--model.mtp_heads"]),
    ({"model.mtp_heads": "-1"}, ["model.mtp_heads is -1", "positive"]),
    ({"model.mtp_heads": "2", "train.mtp_weight": "0"}, ["train.mtp_weight", "positive"]),
])
def test_bad_mtp_options_are_named(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", overrides=overrides)
    assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)
