"""Data-parallel training across processes started by torchrun (gloo on CPU, nccl on CUDA).

Every rank plans the same steps from the same seed, so no data is sent: each rank takes its share of a
step's sequences, chosen by the length-aware balancer (or round-robin), and packs them into rows of its
own. A rank's summed loss is divided by the whole step's target count, so the all-reduced gradient is the
single-process gradient of the same step, whatever the split.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..batch import Batch
from ..data.balance import CostModel, balance, round_robin
from ..data.loader import MicroBatch, StepLoader


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_master(self) -> bool:
        """Rank 0 alone logs, writes metrics and saves checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_from_torchrun() -> DistEnv:
    """The process's place in the job, from the variables torchrun sets (a plain run is rank 0 of 1)."""
    get = lambda k, d: int(os.environ.get(k, d))  # noqa: E731
    return DistEnv(get("RANK", 0), get("WORLD_SIZE", 1), get("LOCAL_RANK", 0), get("LOCAL_WORLD_SIZE", 1))


def init(env: DistEnv, device: torch.device) -> None:
    if device.type == "cuda":
        # Before NCCL starts: each rank's collectives and default CUDA tensors live on its own GPU, not on GPU 0.
        torch.cuda.set_device(device)
    if env.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def collective_device() -> torch.device:
    """Where a collective's tensors must live: NCCL reduces only CUDA tensors (the current GPU), gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def sum_across(env: DistEnv, value: float) -> float:
    return sums_across(env, [value])[0]


def sums_across(env: DistEnv, values: list[float]) -> list[float]:
    """Each value summed over the ranks, all in one all-reduce."""
    if not env.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(t)
    return t.tolist()


def max_across(env: DistEnv, value: float) -> float:
    if not env.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def assigner(mode: str, cost: CostModel) -> Callable[[Sequence[int], int], list[list[int]]]:
    """Sequence lengths, ranks -> sequence indices per rank."""
    if mode == "round_robin":
        return round_robin
    return lambda lengths, ranks: balance(lengths, ranks, cost)


def rank_share(loader: StepLoader, specs: list, env: DistEnv,
               assign: Callable[[Sequence[int], int], list[list[int]]]) -> tuple[list[MicroBatch], int, list[int]]:
    """This rank's micro-batches of a step, the step's target count over all ranks (the loss divisor) and
    the tokens each rank got (for logging)."""
    seqs = [q for spec in specs for q in spec]
    lengths = [loader.seq_length(q) for q in seqs]
    groups = assign(lengths, env.world_size)
    mine = [seqs[i] for i in groups[env.rank]]
    micros = [loader.make_batch(s) for s in loader.rows_of(mine)]
    return micros, sum(lengths), [sum(lengths[i] for i in g) for g in groups]


def empty_micro() -> MicroBatch:
    """One token to run through the model when a rank got no sequence this step: DDP needs every rank
    to take part in the gradient all-reduce, and the caller zeroes its loss."""
    one = torch.zeros(1, dtype=torch.long)
    return MicroBatch(one, one.clone(), Batch.from_seqlens([1]))
