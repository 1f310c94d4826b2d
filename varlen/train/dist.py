"""Data-parallel training across processes started by torchrun (gloo on CPU, nccl on CUDA).

Every rank plans the same steps from the same seed, so no data is sent: each rank takes its share of a
step's sequences, chosen by the length-aware balancer (or round-robin), and packs them into rows of its
own. A rank's summed loss is divided by the whole step's target count, so the all-reduced gradient is the
single-process gradient of the same step, whatever the split.

With sequence parallelism (data.rank_tokens below model.max_seq_len, dist.sp), a step whose sequences do not all
fit one rank is planned by data/sp_plan.py: groups of ranks train rows together, each rank holding a slice of
every row (train/sequence_parallel.py), so documents up to max_seq_len train whole.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from ..batch import Batch
from ..config import ConfigError
from ..data.balance import CostModel, balance, round_robin
from ..data.sp_plan import plan_step
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


def shutdown(env: DistEnv, wait: bool = True) -> None:
    """Tear the process groups down; with `wait`, only once every rank has got here."""
    if env.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
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
               assign: Callable[[Sequence[int], int], list[list[int]]],
               capacity: int = 0) -> tuple[list[MicroBatch], int, list[int]]:
    """This rank's micro-batches of a step (rows of at most `capacity` tokens, default the loader's), the
    step's target count over all ranks (the loss divisor) and the tokens each rank got (for logging)."""
    seqs = [q for spec in specs for q in spec]
    lengths = [loader.seq_length(q) for q in seqs]
    groups = assign(lengths, env.world_size)
    mine = [seqs[i] for i in groups[env.rank]]
    micros = [loader.make_batch(s) for s in loader.rows_of(mine, capacity)]
    return micros, sum(lengths), [sum(lengths[i] for i in g) for g in groups]


def empty_micro() -> MicroBatch:
    """One token to run through the model when a rank got no sequence this step: DDP needs every rank
    to take part in the gradient all-reduce, and the caller zeroes its loss."""
    one = torch.zeros(1, dtype=torch.long)
    return MicroBatch(one, one.clone(), Batch.from_seqlens([1]))


# ------------------------------------------------------------------------------------------ sequence parallelism

@dataclass
class SPLayout:
    """How a job may split rows over ranks (dist.sp, data.rank_tokens): the planner's mode and the degrees it
    may use, the tokens a rank holds of a row, and one process group per block of ranks a plan can name."""
    mode: str                        # auto (split only the steps that need it) | static (every row, one degree)
    degrees: tuple[int, ...]         # group sizes the planner may use
    cap: int                         # tokens one rank holds of a row
    static_degree: int | None
    groups: dict[tuple[int, ...], object]  # ranks -> torch.distributed process group (degree >= 2 only)


def sp_layout(sp: str, rank_tokens: int, max_seq_len: int, n_head: int, env: DistEnv,
              capacity: int) -> SPLayout | None:
    """The job's layout, or None when no row is ever split (data parallelism as before). Raises ConfigError
    for options this job cannot run. Every rank must call it (it creates the process groups, collectively)."""
    cap = rank_tokens or capacity
    needs = rank_tokens and rank_tokens < max_seq_len  # some document can be longer than one rank holds
    if sp == "off" or (sp == "auto" and not needs):
        return None
    ranks = env.world_size
    if ranks == 1:
        raise ConfigError(f"data.rank_tokens ({rank_tokens}) below model.max_seq_len ({max_seq_len}) splits long "
                          f"documents over ranks, and dist.sp {sp} splits rows, but this is one process; run "
                          f"with --nproc 2 or more, or raise data.rank_tokens to {max_seq_len}")
    if sp == "auto":
        degrees = tuple(d for d in (2 ** i for i in range(ranks.bit_length())) if ranks % d == 0 and n_head % d == 0)
        static = None
    else:
        static = int(sp)
        if ranks % static or n_head % static:
            raise ConfigError(f"dist.sp {static} must divide the number of ranks ({ranks}) and model.n_head "
                              f"({n_head}); use a common divisor, or --dist.sp auto")
        degrees = (static,)
    if max(degrees) * cap < max_seq_len:
        raise ConfigError(f"documents of model.max_seq_len {max_seq_len} tokens need {-(-max_seq_len // cap)} ranks "
                          f"at data.rank_tokens {cap}, but this job can split a row over at most {max(degrees)} "
                          f"(--nproc {ranks}, model.n_head {n_head}); raise data.rank_tokens or run more ranks")
    # Blocks of d consecutive ranks starting at multiples of d: the layouts sp_plan makes from power-of-two (or one)
    # sizes, largest first. new_group is collective, so every rank creates every block in the same order.
    groups = {}
    for d in degrees:
        if d > 1:
            for start in range(0, ranks, d):
                block = tuple(range(start, start + d))
                groups[block] = dist.new_group(list(block))
    return SPLayout("static" if static else "auto", degrees, cap, static, groups)


def sp_share(loader: StepLoader, specs: list, env: DistEnv, layout: SPLayout, cost: CostModel,
             assign: Callable[[Sequence[int], int], list[list[int]]],
             ) -> tuple[list[MicroBatch], int, list[int], list[int]]:
    """rank_share with sequence parallelism: this rank's micro-batches (rows of its group, each with the group to
    split it over), the step's target count, the tokens each rank holds, and each rank's group size. A step
    whose sequences all fit one rank is shared as rank_share does (auto); otherwise sp_plan groups the ranks."""
    seqs = [q for spec in specs for q in spec]
    lengths = [loader.seq_length(q) for q in seqs]
    if layout.mode == "auto" and max(lengths, default=0) <= layout.cap:
        return (*rank_share(loader, specs, env, assign, layout.cap), [1] * env.world_size)
    plan = plan_step(lengths, env.world_size, cost, layout.cap, layout.degrees,
                     mode=layout.mode, static_degree=layout.static_degree)
    g = plan.group_of(env.rank)
    group = layout.groups[g.ranks] if g.degree > 1 else None
    rows = loader.rows_of([seqs[i] for i in g.seqs], g.degree * layout.cap)
    micros = [dataclasses.replace(loader.make_batch(s), group=group) for s in rows]
    return micros, sum(lengths), plan.rank_tokens(lengths), [plan.degree_of_rank(r) for r in range(env.world_size)]
