"""Ulysses sequence parallelism: the pure splits, and real gloo processes whose shard losses and gradients,
summed over their group, equal one process training the whole row."""
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
import torch.nn.functional as F

from varlen.batch import Batch
from varlen.config import ModelConfig
from varlen.model.attention import get_attention
from varlen.model.mtp import IGNORE, head_targets
from varlen.model.transformer import Transformer
from varlen.train.sequence_parallel import SPBatch, kv_repeat, shard_bounds

BASE = dict(vocab_size=97, dim=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128, attention="sdpa_docs")
# Four processes: degree-2 cases run on the groups {0, 1} and {2, 3} (so a group's rank is not the global
# one), degree-4 cases on the whole world. name: (model fields, document lengths, degree, kv copies expected)
WORLD = 4
CASES = {
    "kv_sharded": (dict(n_kv_head=2), [37, 50, 13], 2, 1),       # the middle document crosses the shard cut
    "kv_replicated": (dict(n_kv_head=1), [37, 50, 13], 2, 2),
    "odd_row": (dict(n_kv_head=2), [37, 50, 14], 2, 1),          # 101 tokens: shards of 51 and 50
    "degree4_kv_copied": (dict(n_kv_head=2), [37, 50, 14], 4, 2),  # 2 kv heads over 4 ranks: 4 copies
    "degree4_one_document": (dict(n_kv_head=1), [101], 4, 4),    # sdpa_docs' single-sequence path
    "one_length_documents": (dict(n_kv_head=2), [25, 25, 25, 25], 2, 1),  # sdpa_docs' one-group path
    "reference_backend": (dict(n_kv_head=2, attention="reference"), [20, 30, 9], 2, 1),
    "mtp_block_head": (dict(n_kv_head=2, mtp_heads=1), [37, 50, 14], 2, 1),  # the head attends through SP too
    "row_shorter_than_group": (dict(n_kv_head=2), [2, 1], 4, 2),  # the last rank holds no token
}
TIMEOUT_S = 120


def setup_case(fields: dict, seqlens: list[int]):
    """The same model (seed 0, float32) and row in every process."""
    cfg = ModelConfig(**{**BASE, **fields})
    torch.manual_seed(0)
    model = Transformer(cfg)
    gen = torch.Generator().manual_seed(1)
    T = sum(seqlens)
    ids = torch.randint(cfg.vocab_size, (T,), generator=gen)
    targets = torch.randint(cfg.vocab_size, (T,), generator=gen)
    full = Batch.from_seqlens(seqlens)
    targets[full.cu_seqlens[1:].long() - 1] = IGNORE  # as the loader does: no target past a document's end
    return model, ids, targets, full


def row_loss(model, ids, targets, full: Batch, sp: SPBatch | None = None) -> torch.Tensor:
    """Summed cross-entropy (plus MTP heads') of the row, or of this rank's shard of it given `sp`. Head
    targets come from the whole row's documents, then are cut like everything else."""
    cut = sp.local if sp is not None else (lambda x: x)
    logits, heads = model(cut(ids), sp or full, heads=True)
    loss = F.cross_entropy(logits, cut(targets), reduction="sum")
    for j, h in enumerate(heads, start=1):
        loss = loss + F.cross_entropy(h, cut(head_targets(targets, full.cu_seqlens, j)), reduction="sum")
    return loss


def _worker(rank: int, port: int, out_dir) -> None:
    torch.set_num_threads(1)  # four processes share two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group, in one order
        results = {}
        for name, (fields, seqlens, degree, _) in CASES.items():
            group = pairs[rank // 2] if degree == 2 else None  # None: the default group, all four ranks
            model, ids, targets, full = setup_case(fields, seqlens)
            sp = SPBatch.shard(full, get_attention(model.cfg.attention), group)
            loss = row_loss(model, ids, targets, full, sp)
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total, group=group)
            grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g, group=group)
            results[name] = {"loss": total, "grads": grads, "bounds": (sp.start, sp.end)}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sp_results(tmp_path_factory):
    """Each rank's results of every case, from one spawn of WORLD processes (startup dominates the cost)."""
    out = tmp_path_factory.mktemp("sp")
    ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, start_method="spawn", join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):  # raises, with the worker's traceback, if one failed
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"sequence-parallel workers still running after {TIMEOUT_S} s: a collective hung?")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", list(CASES))
def test_group_equals_one_process(sp_results, name):
    fields, seqlens, degree, copies = CASES[name]
    model, ids, targets, full = setup_case(fields, seqlens)
    assert kv_repeat(model.cfg.n_head, model.cfg.n_kv_head, degree) == copies, "the case tests something else"
    loss = row_loss(model, ids, targets, full)
    loss.backward()
    for rank, results in enumerate(sp_results):
        got = results[name]
        assert got["bounds"] == shard_bounds(len(ids), degree)[rank % degree]
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n, rank=rank: f"rank {rank}, gradient of {n}: {m}")


def test_group_of_one_is_no_sequence_parallelism(monkeypatch):
    def no_collective(*_):
        raise AssertionError("a group of one rank must not communicate")

    monkeypatch.setattr(funcol, "all_to_all_single_autograd", no_collective)
    model, ids, _, full = setup_case({}, [37, 50, 13])
    sp = SPBatch.shard(full, get_attention("sdpa_docs"))  # no process group: a group of one
    assert (sp.start, sp.end) == (0, 100) and torch.equal(sp.local(ids), ids)
    assert torch.equal(model(sp.local(ids), sp), model(ids, full))


@pytest.mark.parametrize("degree", range(1, 10))
def test_shard_bounds_tile_the_row(degree):
    for T in range(0, 60):
        bounds = shard_bounds(T, degree)
        assert len(bounds) == degree and bounds[0][0] == 0 and bounds[-1][1] == T
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), "contiguous, in rank order"
        sizes = [e - s for s, e in bounds]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), "longer shards first"


def test_a_row_shorter_than_the_group_leaves_ranks_empty():
    assert shard_bounds(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="degree >= 1"):
        shard_bounds(5, 0)


def test_kv_repeat_keeps_each_query_head_with_its_kv_head():
    """For every small GQA shape and degree: the copies split evenly, no fewer copies would, and each rank's
    query heads read, in its own shard, the kv head they read in the whole model."""
    for H in range(1, 25):
        for Hkv in (h for h in range(1, H + 1) if H % h == 0):
            for d in (d for d in range(1, H + 1) if H % d == 0):
                r = kv_repeat(H, Hkv, d)
                Hk = Hkv * r
                assert Hk % d == 0 and H % Hk == 0
                assert not any(Hkv * s % d == 0 and H % (Hkv * s) == 0 for s in range(1, r)), "not the fewest"
                copied = torch.arange(Hkv).repeat_interleave(r)  # copied head -> original head
                g = H // Hk
                for k in range(d):
                    kv_block = copied[k * Hk // d:(k + 1) * Hk // d]  # this rank's kv heads, in order
                    for i in range(H // d):  # local query head i reads local kv head i // g, as attention does
                        assert kv_block[i // g] == (k * H // d + i) // (H // Hkv)


def test_kv_repeat_rejects_heads_the_degree_does_not_divide():
    with pytest.raises(ValueError, match=r"model.n_head=6 .* degree 4; use a degree in \[1, 2, 3, 6\]"):
        kv_repeat(6, 2, 4)
