"""Ulysses sequence parallelism: a group of d ranks trains one packed row, each rank holding a contiguous
slice of its tokens (DeepSpeed-Ulysses, Jacobs et al. 2023).

Embeddings, norms, RoPE, MLPs and the loss work token by token, so they run on the local slice. Attention
needs whole documents: around it an all-to-all trades the sequence shards of q, k and v for head shards of
the whole row (rank k of the group gets heads [k*H/d, (k+1)*H/d) of every token), the unchanged backend
attends over the row's documents, and a second all-to-all trades the output back. Both all-to-alls are
differentiable (backward is the same exchange reversed), so each rank's parameter gradients, summed over the
group, are the gradients of the whole row.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
# torch.distributed.nn.functional.all_to_all_single warns that it is deprecated in favour of these functional
# collectives (torch 2.13) and refuses torch.compile, which training may wrap the model in; these trace.
import torch.distributed._functional_collectives as funcol

from ..batch import Batch
from ..model.attention import AttentionFn


def shard_bounds(num_tokens: int, degree: int) -> list[tuple[int, int]]:
    """[start, end) of each rank's tokens, in rank order: contiguous, covering [0, num_tokens) exactly, with
    num_tokens // degree tokens each and one more on the first num_tokens % degree ranks (the split
    data.sp_plan.Plan.rank_tokens counts). A row shorter than the group leaves its last ranks empty."""
    if degree < 1 or num_tokens < 0:
        raise ValueError(f"cannot split {num_tokens} tokens over {degree} ranks; need degree >= 1, tokens >= 0")
    base, extra = divmod(num_tokens, degree)
    bounds, start = [], 0
    for k in range(degree):
        end = start + base + (k < extra)
        bounds.append((start, end))
        start = end
    return bounds


def kv_repeat(n_head: int, n_kv_head: int, degree: int) -> int:
    """Copies of each kv head that head sharding over `degree` ranks needs: 1 when degree divides n_kv_head,
    else the fewest r such that degree divides n_kv_head * r and n_kv_head * r divides n_head. Raises
    ValueError when degree does not divide n_head (the query heads cannot be split evenly)."""
    if n_head % degree:
        divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
        raise ValueError(f"model.n_head={n_head} is not divisible by the sequence-parallel degree {degree}; "
                         f"use a degree in {divisors}")
    # With g = n_head / (n_kv_head * r) query heads per (copied) kv head, query head h reads kv head h // g, and
    # rank k's query block [k*n_head/d, (k+1)*n_head/d) is exactly g x its kv block [k*n_kv_head*r/d, ...): the
    # contiguous split keeps every query head with its kv head, at local index h_local // g as in the model.
    # r = n_head / n_kv_head (one kv copy per query head) always qualifies, so next() finds one.
    return next(r for r in range(1, n_head // n_kv_head + 1)
                if (n_kv_head * r) % degree == 0 and n_head % (n_kv_head * r) == 0)


def group_degree_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size of the group, this process's rank in it); without torch.distributed, (1, 0)."""
    if group is None and not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def seq_to_heads(x: torch.Tensor, num_tokens: int, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """x (T_local, Hx, D): this rank's shard (shard_bounds) of a row of num_tokens tokens -> (num_tokens,
    Hx / d, D): heads [k*Hx/d, (k+1)*Hx/d) of every token of the row, in row order, on rank k. Differentiable."""
    d, rank = group_degree_rank(group)
    if d == 1:
        return x
    n, Hx, D = x.shape
    sizes = _shard_sizes(num_tokens, d, rank, n)
    if Hx % d:
        raise ValueError(f"{Hx} heads cannot be split over {d} ranks")
    # all_to_all_single sends consecutive dim-0 blocks to ranks 0..d-1: lay the shard out head block by block.
    send = x.reshape(n, d, Hx // d, D).transpose(0, 1).reshape(d * n, Hx // d, D)  # (d*n, Hx/d, D)
    # Rank j's n_j tokens arrive j-th: shards are contiguous in rank order, so that is row order.
    return funcol.all_to_all_single_autograd(send, sizes, [n] * d, _named(group))  # (num_tokens, Hx/d, D)


def heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The inverse of seq_to_heads: x (T, H/d, D), this rank's heads of every token of the row -> (T_local, H, D),
    every head of this rank's shard (shard_bounds(T, d)). Differentiable."""
    d, rank = group_degree_rank(group)
    if d == 1:
        return x
    T, h, D = x.shape
    sizes = _shard_sizes(T, d, rank, None)
    n = sizes[rank]
    # Back to each token's own rank; rank j's heads of this rank's n tokens arrive j-th.
    recv = funcol.all_to_all_single_autograd(x.contiguous(), [n] * d, sizes, _named(group))  # (d*n, h, D)
    return recv.view(d, n, h, D).transpose(0, 1).reshape(n, d * h, D)


def _named(group: dist.ProcessGroup | None) -> dist.ProcessGroup:
    # torch.distributed reads None as the default group; the functional collectives reject None: pass it itself.
    return dist.group.WORLD if group is None else group


def _shard_sizes(num_tokens: int, d: int, rank: int, local: int | None) -> list[int]:
    sizes = [end - start for start, end in shard_bounds(num_tokens, d)]
    if local is not None and local != sizes[rank]:
        # Every rank must agree on the split, or the all-to-all mismatches (or hangs); fail here instead.
        raise ValueError(f"rank {rank} of {d} holds {local} tokens, but shard_bounds({num_tokens}, {d}) gives it "
                         f"{sizes[rank]}; slice the row with SPBatch.local")
    return sizes


def ulysses_attend(attend: AttentionFn, full_batch: Batch, group: dist.ProcessGroup | None = None) -> AttentionFn:
    """An attention function over this rank's shard: q (T_local, H, D), k/v (T_local, Hkv, D) -> (T_local, H, D),
    what `attend(q, k, v, full_batch)` gives on these tokens when run on the whole row. Its batch argument is
    ignored: the whole row's `full_batch` describes the documents. A group of one calls `attend` directly."""
    d, _ = group_degree_rank(group)
    T = full_batch.num_tokens

    def sp_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _batch=None) -> torch.Tensor:
        if d == 1:
            return attend(q, k, v, full_batch)
        n, H, D = q.shape
        r = kv_repeat(H, k.shape[1], d)
        if r > 1:
            # Copies sit next to their head (kv_repeat says why that keeps the query-to-kv map); autograd sums
            # the copies' gradients back into the one head, as replication must.
            k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        Hkv = k.shape[1]
        # One all-to-all instead of three: q, k and v side by side within each rank's head block, so rank j's
        # block holds its q heads, then its k heads, then its v heads. (Sizes spelled out, not -1: an empty
        # shard has n = 0, and reshape cannot infer a dimension of a 0-element tensor.)
        blocks = [x.reshape(n, d, x.shape[1] // d, D) for x in (q, k, v)]
        qkv = torch.cat(blocks, dim=2).view(n, H + 2 * Hkv, D)  # (n, H + 2Hkv, D)
        qf, kf, vf = seq_to_heads(qkv, T, group).split([H // d, Hkv // d, Hkv // d], dim=1)  # (T, heads/d, D)
        return heads_to_seq(attend(qf, kf, vf, full_batch), group)  # (n, H, D)

    return sp_attend


@dataclass
class SPBatch:
    """What the model reads in place of a Batch on one rank of a sequence-parallel group. Transformer.trunk
    takes RoPE's `positions` (the row's own positions on this rank's tokens: they run on across shards) and
    calls `attend` instead of its backend. No `layer_view`: that is serving's per-layer cache path."""
    full: Batch                # the whole row: cu_seqlens, positions (e.g. for MTP head targets)
    start: int                 # this rank's tokens are [start, end) of the row
    end: int
    positions: torch.Tensor    # (end - start,) int64
    attend: AttentionFn

    @classmethod
    def shard(cls, full: Batch, attend: AttentionFn, group: dist.ProcessGroup | None = None) -> "SPBatch":
        """This rank's view of the row `full`, attending with the backend `attend` over whole documents."""
        d, rank = group_degree_rank(group)
        start, end = shard_bounds(full.num_tokens, d)[rank]
        return cls(full, start, end, full.positions[start:end], ulysses_attend(attend, full, group))

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """Any per-token tensor of the whole row (ids, targets: (T, ...)) -> this rank's slice (T_local, ...)."""
        return x[self.start:self.end]
