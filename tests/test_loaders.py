"""Batching modes over one token store: what each step holds, and exact resume from (epoch, step)."""
import numpy as np
import pytest

from varlen.config import DataConfig
from varlen.data.corpus import Corpus
from varlen.data.loader import IGNORE, make_loader
from varlen.data.tokens import prepare, split_documents

from .helpers import python_corpus


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    corpus = python_corpus(root / "corpus", n_files=40)
    _, store = prepare(Corpus(str(corpus), "*.py"), 320, root / "cache", log=lambda _: None)
    return store


def loader(store, **kw):
    data = DataConfig(tokens_per_step=512, row_tokens=256, **kw)
    train, _ = split_documents(store.num_docs, 0.1)
    return make_loader(data, 64, 1, store, train, seed=3)


_PAIRS = {}


def in_some_document(store, ids, targets):
    """Every (input, target) pair is two consecutive tokens of one document."""
    if id(store) not in _PAIRS:
        _PAIRS[id(store)] = {(int(a), int(b)) for d in range(store.num_docs)
                             for a, b in zip(store.doc(d)[:-1], store.doc(d)[1:])}
    return all((int(a), int(b)) in _PAIRS[id(store)] for a, b in zip(ids, targets))


@pytest.mark.parametrize("batching", ["pack", "dd", "concat_chunk", "pad"])
def test_resume_from_state_gives_the_same_steps(store, batching):
    a = loader(store, batching=batching)
    for _ in range(a.steps_per_epoch + 3):  # across an epoch boundary
        a.next_step()
    state = a.state_dict()
    b = loader(store, batching=batching)
    b.load_state_dict(state)
    for _ in range(5):
        for x, y in zip(a.next_step(), b.next_step()):
            assert np.array_equal(x.ids, y.ids) and np.array_equal(x.targets, y.targets)
            assert x.batch.seqlens == y.batch.seqlens


def test_dd_steps_hold_one_bucket_and_constant_tokens(store):
    dd = loader(store, batching="dd", dd_lo=3, curriculum="uniform")
    seen = set()
    for _ in range(dd.steps_per_epoch):
        micros = dd.next_step()
        lengths = {n for m in micros for n in m.batch.seqlens}
        assert len(lengths) == 1, "a step mixes buckets"
        seen |= lengths
        assert sum(m.num_targets for m in micros) == 512
        assert all(m.num_targets <= 256 or len(m.batch.seqlens) == 1 for m in micros)
        for m in micros:
            assert in_some_document(store, m.ids[:50], m.targets[:50])
    assert seen <= {8, 16, 32, 64} and len(seen) > 1


def test_concat_chunk_windows_cross_documents_and_pad_has_no_loss_on_padding(store):
    cc = loader(store, batching="concat_chunk")
    micros = [m for _ in range(4) for m in cc.next_step()]
    assert all(set(m.batch.seqlens) == {64} for m in micros)
    assert sum(m.num_targets for m in cc.next_step()) == 512
    starts = [start for step in cc.plan()[:3] for row in step for _, start in row]
    assert sorted(starts) != list(range(min(starts), min(starts) + 64 * len(starts), 64)), \
        "a step's windows are consecutive; they should be drawn from the whole epoch"
    # Windows run straight through documents: somewhere an input is a document's end-of-document frame
    # token and its target the next document's first token.
    eod = int(store.doc(0)[-1])
    assert any(int(t) == eod for m in micros for t in m.ids[1:])
    pad = loader(store, batching="pad")
    m = pad.next_step()[0]
    L = m.batch.max_seqlen
    assert set(m.batch.seqlens) == {L}
    micros = [x for _ in range(5) for x in pad.next_step()]
    assert sum(int((x.targets == IGNORE).sum()) for x in micros) > 0, "long-tailed pieces always pad"
    assert all(x.num_targets == int((x.targets != IGNORE).sum()) for x in micros)
    keep = m.targets != IGNORE
    assert in_some_document(store, m.ids[keep][:80], m.targets[keep][:80])
    assert 0 < pad.fill_ratio() < 1 and cc.fill_ratio() == 1.0


def test_dd_rows_keep_the_row_cap_unless_a_chunk_is_longer(store):
    # max_seq_len 512, row_tokens 128: the 512 and 256 buckets need longer rows, shorter buckets do not.
    data = DataConfig(tokens_per_step=1024, row_tokens=128, batching="dd", dd_lo=5, curriculum="cyclic")
    train, _ = split_documents(store.num_docs, 0.1)
    dd = make_loader(data, 512, 1, store, train, seed=3)
    seen = set()
    for step in dd.plan()[:40]:
        L = step[0][0].length
        seen.add(L)
        assert all(sum(c.length for c in row) <= max(128, L) for row in step)
        assert sum(c.length for row in step for c in row) == 1024
        for share in (step[0], [c for row in step for c in row]):  # a rank's share is packed the same way
            assert all(sum(c.length for c in row) <= max(128, L) for row in dd.rows_of(share))
    assert {64, 512} <= seen
