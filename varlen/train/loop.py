"""Packed training: setup (data, model, optimizer, resume) -> main (the step loop) -> fit (one step).

The loss of an optimizer step is the sum of cross-entropies over every target token of all its
micro-batches divided by their total count, so it equals the token mean over the same documents run
one by one, whatever the packing or the gradient accumulation.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import io, load_model
from ..config import Config, ConfigError, save_json
from ..data.corpus import Corpus
from ..data.balance import CostModel
from ..data.sp_plan import SPCost
from ..data.loader import MicroBatch, StepLoader, make_loader, step_layout, validation_micros
from ..data.tokenizer import TextTokenizer
from ..data.tokens import TokenStore, prepare, split_documents
from ..model.attention import choose_backend, get_attention
from ..model.mtp import freeze_trunk, head_loss_sums, head_target_counts, load_with_heads
from ..model.transformer import Transformer
from ..precision import PrecisionChoice, choose_dtype
from . import calibrate, dist, mfu
from .dist import DistEnv
from .sequence_parallel import SPBatch
from .optim import make_optimizer
from .schedule import lr_at

METRICS = "metrics.jsonl"


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA device is visible; use --train.device cpu")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """bf16 autocast, or nothing for float32: the weights and optimizer state stay float32 either way."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()


def training_precision(requested: str, device: torch.device, env: DistEnv, resumed: str | None) -> PrecisionChoice:
    """choose_dtype's answer for train.dtype, kept for the whole run: a resumed `auto` run reuses the dtype it
    started with (`resumed`), so a probe that answers differently this time cannot break exact resumption.
    Under torchrun rank 0 alone probes (probes running at once on shared cores would disturb each other) and
    every rank follows it, as all must run the same numerics. Call on every rank."""
    if requested == "auto" and resumed:
        return PrecisionChoice(getattr(torch, resumed), f"auto -> {resumed}: as the run chose at its start")
    if requested != "auto" or not env.enabled:
        return choose_dtype(requested, device)
    choice = choose_dtype(requested, device) if env.is_master else None
    bf16 = dist.sum_across(env, float(choice is not None and choice.dtype == torch.bfloat16)) > 0
    return choice or PrecisionChoice(torch.bfloat16 if bf16 else torch.float32, "auto: rank 0's choice")


def loss_sum(model: torch.nn.Module, micro: MicroBatch, amp, mtp_weight: float = 0.0) -> torch.Tensor:
    """Summed (not averaged) cross-entropy of one micro-batch, so steps can divide by their own count.

    With mtp_weight > 0, plus mtp_weight x each MTP head's summed cross-entropy (its targets never cross a
    sequence boundary); the step still divides by the next-token target count alone.
    """
    return objective_and_next_token_loss(model, micro, amp, mtp_weight)[0]


def objective_and_next_token_loss(model: torch.nn.Module, micro: MicroBatch, amp, mtp_weight: float,
                                  attention: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum's value, its next-token part): the same tensor twice without MTP heads. A row with a
    sequence-parallel group gives this rank's part: the targets of its slice of the row."""
    if not mtp_weight:
        ids, batch, local = model_inputs(micro, attention)
        with amp:
            logits = model(ids, batch)
        loss = F.cross_entropy(logits.float(), local(micro.targets), reduction="sum")
        return loss, loss
    base, heads = loss_sums(model, micro, amp, attention)
    loss = base
    for head in heads:
        loss = loss + mtp_weight * head
    return loss, base


def model_inputs(micro: MicroBatch, attention: str = "auto") -> tuple[torch.Tensor, object, Callable]:
    """(ids, batch, local) to run the model on: the whole row, or with a sequence-parallel group this rank's
    slice of it with an SPBatch that attends over whole documents; local() cuts any per-token tensor of the row
    to the same tokens."""
    if micro.group is None:
        return micro.ids, micro.batch, lambda x: x
    attend = get_attention(choose_backend(attention, micro.ids.device))
    sp = SPBatch.shard(micro.batch, attend, micro.group)
    return sp.local(micro.ids), sp, sp.local


def group_size(micro: MicroBatch) -> int:
    return 1 if micro.group is None else torch.distributed.get_world_size(micro.group)


def loss_sums(model: torch.nn.Module, micro: MicroBatch, amp, attention: str = "auto",
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Summed next-token cross-entropy of one micro-batch, and each MTP head's (none without heads)."""
    ids, batch, local = model_inputs(micro, attention)
    with amp:
        logits, head_logits = model(ids, batch, heads=True)
    base = F.cross_entropy(logits.float(), local(micro.targets), reduction="sum")
    return base, head_loss_sums(head_logits, micro.targets, micro.batch.cu_seqlens, local)


@torch.no_grad()
def evaluate(model: torch.nn.Module, micros: list[MicroBatch], device: torch.device, amp) -> dict:
    """{"val_loss": next-token loss per target token} and, with MTP heads, "val_loss_heads": each head's
    loss per its own target; attention stays within each document, as in training."""
    model.eval()
    total, count = 0.0, 0
    head_total = head_count = 0  # arrays of one entry per head once a batch shows the heads
    for m in micros:
        base, heads = loss_sums(model, m.to(device), amp)
        total += base.item()
        count += m.num_targets
        if heads:
            head_total = head_total + np.array([h.item() for h in heads])
            head_count = head_count + np.array(head_target_counts(m.targets, m.batch.cu_seqlens, len(heads)))
    model.train()
    out: dict = {"val_loss": total / max(count, 1)}
    if np.ndim(head_total):
        out["val_loss_heads"] = (head_total / np.maximum(head_count, 1)).tolist()
    return out


def unigram_entropy(store: TokenStore, doc_ids: np.ndarray) -> float:
    """Entropy (nats) of the target-token frequencies: the loss of the best context-free model."""
    counts = np.zeros(int(store.tokens.max()) + 1, dtype=np.int64)
    for i in doc_ids:
        counts += np.bincount(store.doc(int(i))[1:], minlength=len(counts))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@dataclass
class Run:
    """Everything a training run carries from setup into the loop."""
    cfg: Config
    run_dir: Path
    device: torch.device
    model: Transformer
    step_model: torch.nn.Module   # the compiled wrapper when train.compile, else the model itself
    optimizer: torch.optim.Optimizer
    loader: StepLoader
    val: list[MicroBatch]
    tokenizer: TextTokenizer
    start_step: int
    info: dict
    env: DistEnv
    assign: Callable            # lengths, ranks -> sequence indices per rank (used when ranks > 1)
    precision: PrecisionChoice    # bf16 autocast or float32 for the steps and evaluation
    peak_flops: float             # measured matmul FLOP/s of the precision's dtype, over all ranks (for MFU)
    elapsed: float = 0.0          # seconds spent in training steps so far (not eval or saving), kept on resume
    sp: dist.SPLayout | None = None  # sequence parallelism, when rows may be split over ranks
    cost: CostModel | None = None    # the balancing cost model (sequence-parallel planning uses it too)


def setup(cfg: Config, run_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
          env: DistEnv = DistEnv()) -> Run:
    run_dir = Path(run_dir)
    if cfg.train.tensorboard:
        summary_writer_class()  # before minutes of data preparation, not after
    device = pick_device(cfg.train.device, env.local_rank)
    dist.init(env, device)
    if not env.is_master:
        log = lambda msg: None  # noqa: E731  one voice per job
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif env.local_world_size > 1 and device.type == "cpu":
        # Ranks on one machine share its cores; more threads than cores each would thrash.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env.local_world_size))
    ckpt = io.resolve(run_dir) if resume else None
    if ckpt is None and io.list_checkpoints(run_dir):
        raise ConfigError(f"run dir '{run_dir}' already has checkpoints; pass --resume {run_dir} to continue "
                         f"it or --out a new directory")
    corpus = Corpus(cfg.data.corpus, cfg.data.glob, cfg.data.field, cfg.data.skip_bad, cfg.data.max_docs)
    init = None
    if cfg.train.init_from and ckpt is None:
        # The architecture and tokenizer come with the weights; piece length, backend and MTP heads stay the run's.
        init, init_cfg, tokenizer = load_model(cfg.train.init_from)
        had = init_cfg.model.mtp_heads
        if had and cfg.model.mtp_heads and init_cfg.model.mtp_head != cfg.model.mtp_head:
            raise ConfigError(f"{cfg.train.init_from} has {init_cfg.model.mtp_head} MTP heads but this run asks for "
                              f"{cfg.model.mtp_head} heads; pass --model.mtp_head {init_cfg.model.mtp_head}")
        if had > cfg.model.mtp_heads:
            log(f"warning: {cfg.train.init_from} has {had} MTP heads; this run keeps {cfg.model.mtp_heads} "
                f"(pass --model.mtp_heads {had} --model.mtp_head {init_cfg.model.mtp_head} to keep them all)")
        cfg.model = dataclasses.replace(init_cfg.model, max_seq_len=cfg.model.max_seq_len,
                                        attention=cfg.model.attention, mtp_heads=cfg.model.mtp_heads,
                                        mtp_head=cfg.model.mtp_head)
        log(f"initialising from {cfg.train.init_from} ({init.num_params() / 1e6:.2f}M parameters)")
    else:
        tokenizer = io.load_tokenizer(ckpt) if ckpt else None
    if not env.is_master:
        dist.barrier(env)  # rank 0 trains the tokenizer and fills the cache; the others then read it
    tokenizer, store = prepare(corpus, cfg.model.vocab_size, cfg.data.cache_dir or None, log=log,
                               tokenizer=tokenizer)
    if env.is_master:
        dist.barrier(env)
    if init is None and ckpt is None:
        cfg.model.vocab_size = tokenizer.vocab_size  # a small corpus can give fewer merges than asked for
    train_ids, val_ids = split_documents(store.num_docs, cfg.data.val_fraction)
    _, capacity = step_layout(cfg.data.tokens_per_step, cfg.model.max_seq_len, cfg.train.grad_accum,
                              cfg.data.row_tokens)
    try:
        loader = make_loader(cfg.data, cfg.model.max_seq_len, cfg.train.grad_accum, store, train_ids, cfg.train.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    val = validation_micros(store, val_ids, capacity, cfg.model.max_seq_len, cfg.train.eval_tokens)

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    if init is not None:
        copied = load_with_heads(model, init.state_dict())
        if copied:
            log(f"MTP heads {copied} start as copies of the trunk's last layer")
    if cfg.train.freeze_trunk:  # before the optimizer, which takes only parameters that require grad
        log(f"trunk frozen: training {freeze_trunk(model) / 1e6:.2f}M MTP head parameters")
    model = model.to(device)
    optimizer = make_optimizer(model, cfg.train)
    start_step, elapsed, resumed_dtype = 0, 0.0, None
    if ckpt is not None:
        io.load_weights(model, ckpt)
        state = io.load_train_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        start_step = int(state["step"])
        elapsed = float(state.get("time", 0.0))
        # Checkpoints written before auto could pick bf16 on a CPU ran the old rule: bf16 on CUDA only.
        resumed_dtype = state.get("dtype", "bfloat16" if device.type == "cuda" else "float32")
        if env.is_master:
            _truncate_metrics(run_dir / METRICS, start_step)
        log(f"resuming {run_dir} from {ckpt.name} (step {start_step})")
    elif env.is_master:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / METRICS).unlink(missing_ok=True)
    precision = training_precision(cfg.train.dtype, device, env, resumed_dtype)
    # Rank 0 measures for all (ranks share a machine's cores; probes at once would disturb each other).
    peak = mfu.matmul_peak(precision.dtype, device.type, torch.get_num_threads()) if env.is_master else 0.0
    peak_flops = dist.sum_across(env, peak) * env.world_size
    # Both models price sequence parallelism's all-to-all too (sp_plan.SPCost): the FLOP model by an assumed
    # link speed, a calibrated one by a timed all-to-all (`varlen bench calibrate`).
    act_bytes = torch.finfo(precision.dtype).bits // 8  # what the all-to-all moves per element
    cost = (calibrate.load(cfg.data.cost_model, cfg.model, act_bytes) if cfg.data.cost_model
            else SPCost.from_flops(cfg.model, element_bytes=act_bytes))
    assign = dist.assigner(cfg.data.balance, cost)
    sp = dist.sp_layout(cfg.dist.sp, cfg.data.rank_tokens, cfg.model.max_seq_len, cfg.model.n_head, env, capacity)
    step_model: torch.nn.Module = model
    if env.enabled:  # rank 0's weights are broadcast here; identical all-reduced steps keep them equal
        step_model = torch.nn.parallel.DistributedDataParallel(model)
    if cfg.train.compile:
        step_model = torch.compile(step_model, dynamic=True)
    if not env.is_master:
        return Run(cfg, run_dir, device, model, step_model, optimizer, loader, val, tokenizer, start_step, {},
                   env, assign, precision, peak_flops, elapsed, sp, cost)
    save_json(cfg, run_dir / "config.json")
    tokenizer.save_dir(run_dir, cfg.model.max_seq_len)

    entropy = unigram_entropy(store, train_ids)
    info = {
        "documents": store.num_docs, "train_documents": len(train_ids), "val_documents": len(val_ids),
        "tokens": store.num_tokens, "unigram_entropy": entropy, "fill_ratio": loader.fill_ratio(),
        "parameters": model.num_params(), "attention": choose_backend(cfg.model.attention, device),
        "device": str(device), "val_tokens": sum(m.num_targets for m in val), "ranks": env.world_size,
        "balance": cfg.data.balance if env.enabled else None, "dtype": precision.name,
    }
    (run_dir / "data.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"{info['documents']:,} documents ({info['val_documents']} held out), {info['tokens']:,} tokens, "
        f"unigram entropy {entropy:.3f} nats/token; packed rows {100 * info['fill_ratio']:.2f}% full; "
        f"model {info['parameters'] / 1e6:.2f}M parameters, attention {info['attention']} on {device}"
        + (f"; {env.world_size} ranks, {cfg.data.balance} split" if env.enabled else ""))
    log(f"precision: {precision.reason}" + (" (bf16 autocast, float32 weights and optimizer state)"
                                            if precision.dtype == torch.bfloat16 else "")
        + f"; {precision.name} matmul peak {peak_flops / 1e9:,.0f} GFLOP/s (MFU is against it)")
    return Run(cfg, run_dir, device, model, step_model, optimizer, loader, val, tokenizer, start_step, info,
               env, assign, precision, peak_flops, elapsed, sp, cost)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint; the resumed run logs them again."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= last_step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError):  # a line cut short by the kill
            continue
    path.write_text("".join(ln + "\n" for ln in keep))


def fit(run: Run, micros: list[MicroBatch], lr: float, amp, n_targets: int = 0) -> tuple[float, float, float, float]:
    """One optimizer step over this rank's micro-batches, whose loss is divided by `n_targets`, the step's
    target count over all ranks. Returns (the objective, the next-token loss, grad norm before clipping, the
    step's model FLOPs over all ranks)."""
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    n_targets = n_targets or sum(m.num_targets for m in micros)
    ranks = run.env.world_size
    weight = 1.0
    if not micros:  # this rank got nothing this step but must join the all-reduce: a zero-weight token
        micros, weight = [dist.empty_micro()], 0.0
    loss_total = next_token_total = 0.0
    # A row split over a group is computed once by the group: each rank counts its share.
    flops = sum(mfu.step_flops(run.cfg.model, m.batch.seqlens) / group_size(m) for m in micros) * weight
    for k, m in enumerate(micros):
        # Gradients are all-reduced once per step, on the last backward: DDP averages over ranks, so
        # each rank scales its part up by the rank count to make the result the sum.
        last = k == len(micros) - 1
        with run.step_model.no_sync() if run.env.enabled and not last else nullcontext():
            loss, next_token = objective_and_next_token_loss(run.step_model, m.to(run.device), amp,
                                                             run.cfg.train.mtp_weight, run.cfg.model.attention)
            loss, next_token = loss / n_targets, next_token.detach() / n_targets
            if weight != 1.0:
                loss, next_token = loss * weight, next_token * weight
            (loss * ranks if ranks > 1 else loss).backward()
        loss_total += loss.item()
        next_token_total += next_token.item()
    loss_total, next_token_total, flops = dist.sums_across(run.env, [loss_total, next_token_total, flops])
    clip = run.cfg.train.grad_clip if run.cfg.train.grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip).item()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_total, next_token_total, grad_norm, flops


def main(run: Run, log: Callable[[str], None] = print, progress: bool = True) -> dict:
    cfg, t = run.cfg, run.cfg.train
    amp = autocast_for(run.device, run.precision.dtype)
    last: dict = {}
    master = run.env.is_master
    bar = tqdm(total=t.max_steps, initial=run.start_step, disable=not (progress and master), unit="step",
               dynamic_ncols=True)
    # On resume, purge_step drops what a killed run logged past its last checkpoint, as metrics.jsonl is cut.
    board = tensorboard_writer(run.run_dir, run.start_step + 1) if master and t.tensorboard else None
    with open(run.run_dir / METRICS, "a") if master else open(os.devnull, "w") as metrics:
        for step in range(run.start_step + 1, t.max_steps + 1):
            t0 = time.perf_counter()
            rank_tokens = sp_degrees = None
            if run.sp is not None:
                micros, n_tokens, rank_tokens, sp_degrees = dist.sp_share(run.loader, run.loader.next_specs(),
                                                                           run.env, run.sp, run.cost, run.assign)
            elif run.env.enabled:
                micros, n_tokens, rank_tokens = dist.rank_share(run.loader, run.loader.next_specs(), run.env,
                                                                run.assign)
            else:
                micros = run.loader.next_step()
                n_tokens = sum(m.num_targets for m in micros)
            objective, loss, grad_norm, flops = fit(run, micros, lr_at(step, t), amp, n_tokens)
            dt = dist.max_across(run.env, time.perf_counter() - t0)  # ranks must agree on max_time's stop
            run.elapsed += dt
            # `loss` is the next-token loss alone, comparable with val_loss and with runs without heads.
            last = {"step": step, "loss": loss, "lr": lr_at(step, t), "tokens_per_s": n_tokens / dt,
                    "tokens": n_tokens, "grad_norm": grad_norm, "epoch": run.loader.epoch, "time": run.elapsed,
                    "mfu": flops / dt / run.peak_flops}
            if t.mtp_weight and cfg.model.mtp_heads:
                last["loss_with_heads"] = objective  # what the optimizer minimises: + mtp_weight x head losses
            if rank_tokens is not None:
                last["rank_tokens"] = rank_tokens
            if sp_degrees is not None:
                last["sp_degrees"] = sp_degrees  # each rank's group size this step (1: trained alone)
            done = step == t.max_steps or (t.max_time > 0 and run.elapsed >= t.max_time)
            if master and run.val and ((t.eval_every and step % t.eval_every == 0) or done):
                # the plain model under DDP: its wrapper's forward would wait for ranks that do not evaluate
                eval_model = run.model if run.env.enabled else run.step_model
                last.update(evaluate(eval_model, run.val, run.device, amp))  # val_loss (+ val_loss_heads)
            if step % t.log_every == 0 or "val_loss" in last or done:
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                if board is not None:
                    log_scalars(board, last)
            if master and ((t.ckpt_every and step % t.ckpt_every == 0) or done):
                save(run, step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{n_tokens / dt:,.0f}",
                            **({"val": f"{last['val_loss']:.3f}"} if "val_loss" in last else {}))
            if done:
                break
    bar.close()
    if board is not None:
        board.close()
    return last


BOARD_SCALARS = ("loss", "val_loss", "lr", "tokens_per_s", "mfu", "grad_norm")


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises this itself when the tensorboard package is missing
        raise ConfigError("train.tensorboard needs the tensorboard package: pip install 'varlen[tensorboard]', "
                          "or drop --train.tensorboard") from None
    return SummaryWriter


def tensorboard_writer(run_dir: Path, purge_step: int):
    """Event files in the run dir itself, beside metrics.jsonl: `tensorboard --logdir runs` shows every run."""
    return summary_writer_class()(str(run_dir), purge_step=purge_step)


def log_scalars(board, metrics: dict) -> None:
    """The BOARD_SCALARS of one metrics.jsonl line, as train/<name> at its step."""
    for name in BOARD_SCALARS:
        if name in metrics:
            board.add_scalar(f"train/{name}", metrics[name], metrics["step"])
    board.flush()


def save(run: Run, step: int) -> Path:
    rng = {"torch": torch.get_rng_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    state = {"step": step, "time": run.elapsed, "optimizer": run.optimizer.state_dict(), "loader": run.loader.state_dict(), "rng": rng,
             "dtype": run.precision.name}
    return io.save_checkpoint(run.run_dir, step, run.model, run.cfg, run.tokenizer, state,
                              run.cfg.train.keep_last)


def train(cfg: Config, run_dir: str | Path, resume: bool = False, log: Callable[[str], None] = print,
          progress: bool = True, plot: bool = True) -> dict:
    """Train (or resume) and return the last step's metrics; writes loss.png at the end.

    Under torchrun (WORLD_SIZE > 1 in the environment) this process is one data-parallel rank."""
    env = dist.env_from_torchrun()
    try:
        last = _train_and_report(cfg, run_dir, resume, log, progress, plot, env)
    except BaseException:
        dist.shutdown(env, wait=False)  # a peer may be inside a collective: waiting for it would hang
        raise
    # Every rank leaves together, after rank 0's last save and plot: a gloo rank that tears its process group
    # down while a peer still works can abort at exit ("terminate called without an active exception").
    dist.shutdown(env)
    return last


def _train_and_report(cfg: Config, run_dir: str | Path, resume: bool, log: Callable[[str], None], progress: bool,
                      plot: bool, env: dist.DistEnv) -> dict:
    run = setup(cfg, run_dir, resume, log, env)
    if not env.is_master:
        log = lambda msg: None  # noqa: E731
    if run.start_step >= cfg.train.max_steps:
        log(f"run already at step {run.start_step} >= train.max_steps {cfg.train.max_steps}; raise "
            f"--train.max_steps to train further")
        return {}
    if cfg.train.max_time > 0 and run.elapsed >= cfg.train.max_time:
        log(f"run already trained {run.elapsed:.0f} s >= train.max_time {cfg.train.max_time:g}; raise "
            f"--train.max_time to train further")
        return {}
    last = main(run, log, progress)
    if plot and env.is_master:
        from ..plots import plot_loss
        log(f"loss plot: {plot_loss(run.run_dir)}")
    if env.is_master:
        _cleanup_tmp(run.run_dir)
    return last


def _cleanup_tmp(run_dir: Path) -> None:
    for p in (run_dir / io.CKPT_DIR).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
