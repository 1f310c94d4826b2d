"""Training throughput: varlen's packed rows against Hugging Face Llama fed padded or packed batches.

One run, on one corpus (default the stdlib, 4096-token BPE), one model config, the same pieces (documents cut
to max_seq_len) and the same useful tokens per optimizer step for every method. The pieces are --steps
length-grouped batches of B, stratified over one of HF's megabatches (50*B pieces drawn at random from
the whole corpus), so every length range is represented and (ii) gets HF's real, near-uniform batches.

  varlen      varlen Transformer on packed rows (pack_epoch), default CPU attention (sdpa_docs)
  hf_padded   (i)   LlamaForCausalLM (sdpa), B pieces per batch in sampled (random) order, right-padded
  hf_grouped  (ii)  the same, batches grouped by length as Trainer's group_by_length does
  hf_packed   (iii) LlamaForCausalLM (sdpa), padding-free rows (1, T) with position_ids restarting per piece

Every (method, seq_len, dtype, repeat) runs in a fresh process, so its peak RSS is its own. Timing covers
forward, backward, grad clipping and the AdamW step; inputs are built before the clock starts.

The dtype axis (--dtypes, default float32,bfloat16). `float32`: no autocast. `bfloat16`: the forward (and
HF's loss) under torch.autocast("cpu", dtype=torch.bfloat16), weights, gradients and AdamW state float32:
mixed precision as `varlen train` runs train.dtype bfloat16, for varlen and for the HF methods alike. The
HF checks before timing (packed rows vs per-document runs, copied weights) stay float32 in every run: they
test the inputs and the weight copy, and a 1e-3 tolerance means nothing in bf16. MFU is against the
measured dense matmul rate (2048x2048, varlen.train.mfu.matmul_peak) of the row's own dtype, the better of
a measurement before and one after the runs; bf16 matmuls run at a different rate from fp32 (a CPU without
bf16 matrix units emulates them), so one peak for both would say little. The header prints the CPU's
matrix-unit flags (avx512_bf16, amx_bf16, amx_int8): they decide what bf16 can gain. The ratio "varlen x"
compares varlen with each HF method of the same dtype and seq_len.

--repeats N runs every (method, dtype) of a seq_len N times, interleaved (for each repeat: every dtype,
every method), so a change in machine speed hits all of them; each row reports the median useful tokens/s
and the min-max spread over its repeats. A run that fails is not repeated.

--corpus takes what `varlen train --data.corpus` takes (stdlib, a directory with --glob, a .jsonl or a
.parquet file); `short` is benchmarks/short_docs.py's short-document corpus (one document per top-level
function or class of the stdlib, median ~140 tokens, the `short` corpus of dd_vs_concat.py), built once
into <cache>/dd_vs_concat as dd_vs_concat.py builds it. A corpus other than stdlib trains its own BPE of
--vocab tokens (cached like the stdlib's).

    VARLEN_CACHE=/tmp/vcache .venv/bin/python benchmarks/train_throughput.py
    VARLEN_CACHE=/tmp/vcache .venv/bin/python benchmarks/train_throughput.py --dtypes bfloat16 --repeats 3
    VARLEN_CACHE=/tmp/vcache .venv/bin/python benchmarks/train_throughput.py --corpus short --repeats 3
    VARLEN_CACHE=/tmp/vcache .venv/bin/python benchmarks/train_throughput.py --corpus /data/txt --glob '**/*.md'
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import statistics
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from varlen.batch import Batch
from machine import machine_info, matrix_units
from short_docs import build_short_docs
from varlen.config import DataConfig, ModelConfig, TrainConfig
from varlen.data.corpus import Corpus
from varlen.data.loader import make_micro
from varlen.data.pack import Piece, best_fit_decreasing, cut_pieces, materialize, pack_epoch
from varlen.data.tokens import TokenStore, default_cache_dir, prepare
from varlen.model.transformer import Transformer, flops_per_token
from varlen.train.mfu import step_flops
from varlen.train.loop import autocast_for, loss_sum
from varlen.train.mfu import matmul_peak
from varlen.train.optim import make_optimizer

METHODS = ("varlen", "hf_padded", "hf_grouped", "hf_packed")
PADDED = ("hf_padded", "hf_grouped")
LABELS = {
    "varlen": "varlen packed (sdpa_docs)",
    "hf_padded": "HF padded, random order (i)",
    "hf_grouped": "HF padded, group_by_length (ii)",
    "hf_packed": "HF packed position_ids (iii)",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # bfloat16: autocast, float32 master weights
IGNORE = -100

Step = list[list[Piece]]  # one optimizer step: its micro-batches, each a list of pieces


# ----------------------------------------------------------------------------------------------- workload

@dataclass
class Workload:
    """What every method's run at one seq_len shares: model config, pieces and each method's steps."""
    seq_len: int
    batch: int                  # B pieces per padded batch
    capacity: int               # varlen row capacity = useful tokens per optimizer step
    varlen_row_capacity: int    # 0: one varlen row per step; else rows of at most this, accumulated
    row_capacity: int           # tokens per HF padding-free row
    cfg: ModelConfig
    steps: dict[str, list[Step]]
    warmup: dict[str, list[Step]]
    check_row: list[Piece]      # short random pieces: test HF's packed path and the weight copy
    store_path: str             # the token store, opened again by each worker


def all_pieces(store: TokenStore, seq_len: int) -> list[Piece]:
    return cut_pieces(range(store.num_docs), store.lengths, seq_len)


def grouped_megabatch(store: TokenStore, seq_len: int, batch: int, seed: int) -> list[list[Piece]]:
    """The 50 batches Trainer's LengthGroupedSampler makes of one megabatch: 50*B pieces drawn at random
    (seeded) from the whole corpus, sorted by length, longest first, cut into batches of B."""
    pieces = all_pieces(store, seq_len)
    n = min(50 * batch, len(pieces))
    chosen = [pieces[i] for i in np.random.default_rng(seed).permutation(len(pieces))[:n]]
    ordered = sorted(chosen, key=lambda p: -p.length)  # stable: ties keep the random order
    return [ordered[i:i + batch] for i in range(0, n - batch + 1, batch)]


def stratified(batches: list[list[Piece]], n: int) -> list[list[Piece]]:
    """n batches from the middle of n equal slices of the sorted batches: every length range shows up."""
    if n > len(batches):
        raise SystemExit(f"--steps {n} is more than the {len(batches)} batches of one megabatch")
    return [batches[int((k + 0.5) * len(batches) / n)] for k in range(n)]


def padded_len(step: Step) -> int:
    """A padded batch is padded to its longest piece, whichever micro-batch holds it."""
    return max(p.length for mb in step for p in mb)


def split_rows(batch: list[Piece], max_micro_tokens: int) -> Step:
    """Rows of one padded batch in chunks of at most max_micro_tokens padded tokens.

    Only to bound memory (torch's sdpa keeps a float copy of HF's (B, 1, L, L) mask per layer for
    backward: > 24 GB at B=16, L=8192). Every chunk is still padded to the whole batch's longest
    piece, so the work equals the unsplit batch's; rows are independent and the loss is normalised
    by the step's target count, so the gradient is the same too.
    """
    per_micro = max(1, max_micro_tokens // padded_len([batch]))
    return [batch[i:i + per_micro] for i in range(0, len(batch), per_micro)]


def padded_batches(pieces: list[Piece], batch: int, max_micro_tokens: int) -> list[Step]:
    """(i): consecutive pieces of a random order, B per batch, as a shuffled DataLoader gives them."""
    return [split_rows(pieces[i:i + batch], max_micro_tokens) for i in range(0, len(pieces), batch)]


def fitting_capacity(pieces: list[Piece], n_rows: int, seq_len: int) -> int:
    """Smallest capacity (multiple of 64) at which best-fit packs the pieces into at most n_rows rows.

    Starts from the mean useful tokens of a padded batch, so a varlen step holds what a padded step does.
    """
    lengths = [p.length for p in pieces]
    capacity = max(seq_len, math.ceil(sum(lengths) / n_rows / 64) * 64)
    while len(best_fit_decreasing(lengths, capacity)) > n_rows:
        capacity += 64
    return capacity


def packed_subrows(row: list[Piece], row_capacity: int) -> Step:
    """One step's pieces re-packed into rows of at most row_capacity tokens, run with gradient accumulation.

    For (iii): HF's sdpa path builds a dense (T, T) mask per row, so one row per step (T = tens of
    thousands of tokens at 8192) is out of reach on CPU; rows of max_seq_len are what TRL's
    padding_free packing uses.
    """
    lengths = [p.length for p in row]
    return [[row[i] for i in b] for b in best_fit_decreasing(lengths, row_capacity)]


def check_row(store: TokenStore, seq_len: int, capacity: int, seed: int, n: int = 8) -> list[Piece]:
    """n random short pieces (each at most capacity / n tokens) for one row: many document boundaries."""
    pieces = all_pieces(store, seq_len)
    row: list[Piece] = []
    for i in np.random.default_rng(seed + 1).permutation(len(pieces)):
        if pieces[i].length <= capacity // n:
            row.append(pieces[i])
        if len(row) == n:
            break
    return row


def method_steps(groups: list[list[Piece]], capacity: int, varlen_row_cap: int, hf_row_cap: int,
                 max_micro_tokens: int, seed: int) -> dict[str, list[Step]]:
    """Each method's steps over the same pieces: `groups` are the length-grouped batches of (ii)."""
    rng = np.random.default_rng(seed)
    pieces = [p for g in groups for p in g]
    shuffled = [pieces[i] for i in rng.permutation(len(pieces))]
    rows = pack_epoch(pieces, capacity, seed)  # one row per optimizer step
    return {
        # A row wider than varlen_row_cap runs as several (gradient accumulation), as data.row_tokens does.
        "varlen": [packed_subrows(r, varlen_row_cap) if varlen_row_cap else [r] for r in rows],
        "hf_padded": padded_batches(shuffled, len(groups[0]), max_micro_tokens),
        "hf_grouped": [split_rows(groups[i], max_micro_tokens) for i in rng.permutation(len(groups))],
        "hf_packed": [packed_subrows(r, hf_row_cap) for r in rows],
    }


def build_workload(store: TokenStore, cfg: ModelConfig, args: argparse.Namespace, n_steps: int) -> Workload:
    """The timed pieces are n_steps length-grouped batches, stratified over one megabatch, so (ii) sees
    the near-uniform batches HF's grouping really makes while (i) and varlen get a sample that spans
    every length range. Warm-up runs a few other, short pieces (first calls, optimizer state)."""
    seq_len, batch = cfg.max_seq_len, args.batch
    megabatch = grouped_megabatch(store, seq_len, batch, args.seed)
    timed = stratified(megabatch, n_steps)
    used = {p for g in timed for p in g}
    spare = [p for g in megabatch for p in g if p not in used and p.length <= seq_len // 4]
    warm = [[spare[i] for i in np.random.default_rng(args.seed).permutation(len(spare))[:args.warmup_pieces]]]
    capacity = fitting_capacity([p for g in timed for p in g], n_steps, seq_len)
    hf_row_cap = args.packed_row_capacity or seq_len
    varlen_row_cap = max(args.varlen_row_capacity, seq_len) if args.varlen_row_capacity else 0
    steps = method_steps(timed, capacity, varlen_row_cap, hf_row_cap, args.max_micro_tokens, args.seed)
    warmup = method_steps(warm, capacity, varlen_row_cap, hf_row_cap, args.max_micro_tokens, args.seed)
    check = check_row(store, seq_len, hf_row_cap, args.seed)
    return Workload(seq_len, batch, capacity, varlen_row_cap, hf_row_cap, cfg, steps, warmup, check,
                    str(store.path))


# ------------------------------------------------------------------------------------------------- FLOPs

def useful_flops(cfg: ModelConfig, lengths: list[int]) -> float:
    """Forward+backward FLOPs of the real tokens: each piece causal over its own length only."""
    return step_flops(cfg, lengths)


def computed_tokens(method: str, step: Step) -> int:
    if method in PADDED:
        return sum(len(mb) for mb in step) * padded_len(step)
    return sum(p.length for mb in step for p in mb)


def computed_flops(cfg: ModelConfig, method: str, step: Step) -> float:
    """FLOPs the batch shape asks for, attention counted causal (what an ideal kernel would do).

    Padded: B rows of L tokens at length L. Packed: the pieces alone.
    """
    if method in PADDED:
        L = padded_len(step)
        return computed_tokens(method, step) * flops_per_token(cfg, L)
    return useful_flops(cfg, [p.length for mb in step for p in mb])


def shape_stats(cfg: ModelConfig, method: str, steps: list[Step]) -> dict:
    lengths = [p.length for s in steps for mb in s for p in mb]
    computed = sum(computed_tokens(method, s) for s in steps)
    uf = useful_flops(cfg, lengths)
    cf = sum(computed_flops(cfg, method, s) for s in steps)
    return {"steps": len(steps), "micro_batches": sum(len(s) for s in steps), "pieces": len(lengths),
            "useful_tokens": sum(lengths), "computed_tokens": computed, "useful_token_share": sum(lengths) / computed,
            "useful_flops": uf, "computed_flops": cf, "padding_flop_share": 1 - uf / cf,
            # Packed rows holding one piece run plain causal attention in every method: nothing to gain there.
            "single_piece_row_token_share": sum(p.length for s in steps for mb in s if len(mb) == 1 for p in mb)
            / max(sum(lengths), 1)}


# ------------------------------------------------------------------------------------------------ models

def hf_llama_from(model: Transformer):
    """LlamaForCausalLM (sdpa) of the same sizes holding a copy of varlen's weights (the names match HF's)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.cfg
    hc = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                     num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
                     head_dim=c.head_dim, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
                     rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                     tie_word_embeddings=c.tie_embeddings, use_cache=False)
    hf = LlamaForCausalLM._from_config(hc, attn_implementation="sdpa")
    state = {f"model.{k}": v for k, v in model.state_dict().items() if not k.startswith("lm_head")}
    state["lm_head.weight"] = model.output_weight().detach()
    hf.load_state_dict(state, strict=True)
    if c.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr(), "HF did not tie embeddings"
    return hf.train()


@dataclass
class HFInputs:
    kwargs: dict        # for LlamaForCausalLM.forward; the loss is HF's own ForCausalLMLoss
    n_targets: int


def hf_padded_inputs(store: TokenStore, pieces: list[Piece], pad_to: int) -> HFInputs:
    """Right-padded (rows, pad_to) batch; labels are already the next tokens (shift_labels), -100 on pads."""
    ids = torch.zeros(len(pieces), pad_to, dtype=torch.long)
    labels = torch.full((len(pieces), pad_to), IGNORE, dtype=torch.long)
    for i, p in enumerate(pieces):
        x, y, _ = materialize([p], store.doc)
        ids[i, :p.length], labels[i, :p.length] = torch.from_numpy(x), torch.from_numpy(y)
    mask = (labels != IGNORE).long()
    return HFInputs({"input_ids": ids, "attention_mask": mask, "labels": labels, "shift_labels": labels},
                    int(mask.sum()))


def hf_packed_inputs(store: TokenStore, pieces: list[Piece]) -> HFInputs:
    """One (1, T) row, no attention_mask, position_ids restarting at 0 per piece: HF's padding-free path."""
    x, y, seqlens = materialize(pieces, store.doc)
    labels = torch.from_numpy(y)[None]
    positions = Batch.from_seqlens(seqlens).positions[None]
    return HFInputs({"input_ids": torch.from_numpy(x)[None], "position_ids": positions, "labels": labels,
                     "shift_labels": labels}, int(labels.numel()))


# ------------------------------------------------------------------------------------------------ checks

def check_packed_vs_per_doc(hf, store: TokenStore, row: list[Piece]) -> dict:
    """HF logits of a packed row against the same pieces run one by one.

    The same row without position_ids (one causal sequence) shows how large a cross-document leak looks.
    """
    with torch.no_grad():
        packed = hf_packed_inputs(store, row).kwargs
        logits = hf(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        per_doc = torch.cat([hf(input_ids=hf_packed_inputs(store, [p]).kwargs["input_ids"]).logits[0] for p in row])
        naive = hf(input_ids=packed["input_ids"]).logits[0]
    diff = float((logits - per_doc).abs().max())
    return {"pieces": len(row), "tokens": int(logits.shape[0]), "max_abs_diff": diff,
            "max_abs_diff_without_position_ids": float((naive - per_doc).abs().max()),
            "valid": len(row) > 1 and diff < 1e-3}


def check_weights(model: Transformer, hf, store: TokenStore, pieces: list[Piece]) -> float:
    """The copied weights give the same logits: varlen packed vs HF padded, on real tokens only."""
    with torch.no_grad():
        micro = make_micro(store, pieces)
        ours = model(micro.ids, micro.batch)
        inp = hf_padded_inputs(store, pieces, max(p.length for p in pieces)).kwargs
        theirs = hf(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"]).logits
        theirs = theirs[inp["attention_mask"].bool()]  # row-major = piece order = varlen's stream order
    return float((ours - theirs).abs().max())


# ------------------------------------------------------------------------------------------------ worker

def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)


def run_method(method: str, work: Workload, dtype: str, threads: int, seed: int, profile: bool = False) -> dict:
    """One (method, seq_len, dtype): build model and inputs, warm up, time the steps, report."""
    torch.set_num_threads(threads)
    store = TokenStore.open(work.store_path)
    torch.manual_seed(seed)
    model = Transformer(work.cfg)  # float32 in every dtype: master weights, gradients and AdamW state
    result: dict = {"method": method, "dtype": dtype, "seq_len": work.seq_len}
    # torch.autocast("cpu", dtype=torch.bfloat16) for bfloat16, nothing for float32: what varlen's trainer uses,
    # entered around the forward of every method alike.
    amp = autocast_for(torch.device("cpu"), DTYPES[dtype])

    if method == "varlen":
        net = model

        def build(step: Step) -> list:
            return [make_micro(store, mb) for mb in step]

        def loss_of(micro, n_targets: int) -> torch.Tensor:
            return loss_sum(model, micro, amp) / n_targets  # cross-entropy on float32 logits, outside amp

        def targets_of(micro) -> int:
            return micro.num_targets
    else:
        net = hf_llama_from(model)
        if method == "hf_packed":  # before timing, in float32 whatever the dtype: are documents kept apart?
            result["packed_check"] = check_packed_vs_per_doc(net, store, work.check_row)
        if method == "hf_padded":
            result["weights_check_max_abs_diff"] = check_weights(model, net, store, work.check_row)
        del model

        def build(step: Step) -> list:
            if method == "hf_packed":
                return [hf_packed_inputs(store, mb) for mb in step]
            return [hf_padded_inputs(store, mb, padded_len(step)) for mb in step]

        def loss_of(inp: HFInputs, n_targets: int) -> torch.Tensor:
            with amp:  # HF's loss upcasts the logits to float32 itself
                return net(**inp.kwargs, num_items_in_batch=n_targets, use_cache=False).loss

        def targets_of(inp: HFInputs) -> int:
            return inp.n_targets

    train_cfg = TrainConfig()
    optimizer = make_optimizer(net, train_cfg)

    def train_step(micros: list) -> None:
        """As varlen.train.loop.fit: sum CE / step's targets over micro-batches, clip, AdamW step."""
        n_targets = sum(targets_of(m) for m in micros)
        for m in micros:
            loss_of(m, n_targets).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timed = [build(s) for s in work.steps[method]]
    rss_base = psutil.Process().memory_info().rss
    for step in work.warmup[method]:  # first calls and AdamW state allocation, on other pieces
        train_step(build(step))

    load_before = os.getloadavg()[0]
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else nullcontext()
    busy0, own0 = cpu_busy_seconds(), time.process_time()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    with profiler:
        for micros in timed:
            t0 = time.perf_counter()
            train_step(micros)
            times.append(time.perf_counter() - t0)
    busy, own = cpu_busy_seconds() - busy0, time.process_time() - own0
    # Minor page faults: pages the kernel had to hand over (and zero) because big tensors are
    # allocated afresh (glibc mmaps blocks over 32 MiB and unmaps them on free).
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    if profile:
        result["profile"] = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25,
                                                          max_name_column_width=60)
    wall = sum(times)
    result.update({
        "step_seconds": times, "seconds": wall,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux reports KiB
        "rss_before_training_bytes": rss_base, "load_avg_1min_before": load_before,
        "page_fault_bytes_per_step": faults * resource.getpagesize() / len(times),
        # CPU seconds other processes used per wall second while we timed (0 = the machine was ours).
        "other_cpu_cores": max(0.0, (busy - own) / wall),
    })
    return result


def _child(conn, mem_limit: int, *args) -> None:
    # An address-space cap turns running out of memory into an exception here, instead of the kernel's
    # OOM killer picking a victim among every process on the machine.
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    try:
        conn.send(run_method(*args))
    except BaseException as e:  # reported as this run's result; the other runs go on
        conn.send({"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   "traceback": traceback.format_exc()})
    conn.close()


def run_isolated(method: str, work: Workload, dtype: str, args: argparse.Namespace) -> dict:
    """A fresh spawned process per run: its own peak RSS, no allocator state carried over."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, int(args.mem_limit_gib * 2 ** 30), method, work, dtype,
                                            args.threads, args.seed, args.profile))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        result = {"error": "worker died without a result (killed?)"}
    proc.join()
    if proc.exitcode:
        result.setdefault("error", f"worker exit code {proc.exitcode}")
    return result


# ------------------------------------------------------------------------------------------------ machine

def matmul_peaks(dtypes: list[str], threads: int) -> dict[str, float]:
    """Dense 2048x2048 matmul FLOP/s of each dtype at the benchmark's thread count: the machine's practical
    peak in that dtype, the MFU base of its rows. matmul_peak memoizes per process: its cache is dropped so
    that the measurement after the runs measures again."""
    torch.set_num_threads(threads)
    matmul_peak.cache_clear()
    return {d: matmul_peak(DTYPES[d], "cpu", threads) for d in dtypes}


def gflops(peaks: dict[str, float]) -> str:
    return ", ".join(f"{d} {p / 1e9:.1f}" for d, p in peaks.items()) + " GFLOP/s"


# ------------------------------------------------------------------------------------------------ report

def combine_repeats(stats: dict, reps: list[dict]) -> dict:
    """One row from the repeats of a (method, dtype): the median useful tokens/s and its min-max spread, the
    other columns from the median run, except other processes' CPU: the most of any repeat, so its warning
    cannot hide behind a quiet median."""
    if "error" in reps[-1]:  # a failed run is not repeated, so a failure is the last
        return {**stats, **reps[-1], "repeats": len(reps)}
    rates = [stats["useful_tokens"] / r["seconds"] for r in reps]
    median_run = reps[sorted(range(len(reps)), key=rates.__getitem__)[(len(reps) - 1) // 2]]
    rate = statistics.median(rates)
    return {**stats, **median_run, "repeats": len(reps),
            "seconds": stats["useful_tokens"] / rate,  # the median run's own with an odd number of repeats
            "useful_tokens_per_s": rate, "useful_tokens_per_s_min": min(rates), "useful_tokens_per_s_max": max(rates),
            "other_cpu_cores": max(r["other_cpu_cores"] for r in reps),
            "per_repeat": [{"seconds": r["seconds"], "useful_tokens_per_s": x, "other_cpu_cores": r["other_cpu_cores"],
                            "load_avg_1min_before": r["load_avg_1min_before"]} for r, x in zip(reps, rates)]}


def summarize(work: Workload, runs: dict[str, dict[str, list[dict]]],
              peaks: dict[str, float]) -> dict[str, dict[str, dict]]:
    """dtype -> method -> row. MFU is against the row's own dtype's matmul peak; varlen x compares with
    varlen in the same dtype."""
    results = {}
    for dtype, by_method in runs.items():
        rows = {}
        for method, reps in by_method.items():
            row = combine_repeats(shape_stats(work.cfg, method, work.steps[method]), reps)
            row.update(method=method, dtype=dtype)
            if "error" not in row:
                row["useful_flops_per_s"] = row["useful_flops"] / row["seconds"]
                row["mfu"] = row["useful_flops_per_s"] / peaks[dtype]
            rows[method] = row
        base = rows["varlen"].get("useful_tokens_per_s")
        for row in rows.values():
            if base and "useful_tokens_per_s" in row:
                row["varlen_speedup"] = base / row["useful_tokens_per_s"]
        results[dtype] = rows
    return results


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f}G"


def is_invalid(row: dict) -> bool:
    return not row.get("packed_check", {}).get("valid", True)


def spread(row: dict) -> str:
    if row["repeats"] == 1:
        return "-"
    return f"{row['useful_tokens_per_s_min']:,.0f}-{row['useful_tokens_per_s_max']:,.0f}"


def first_with(by_dtype: dict[str, dict[str, dict]], method: str, key: str) -> dict | None:
    """The first dtype's row of `method` that has `key`: the checks run in float32 in every dtype's run."""
    return next((rows[method] for rows in by_dtype.values() if key in rows.get(method, {})), None)


def print_table(work: Workload, by_dtype: dict[str, dict[str, dict]]) -> None:
    v = next(iter(by_dtype.values()))["varlen"]  # the shape columns are the same in every dtype
    print(f"\n=== max_seq_len {work.seq_len}: {v['pieces']} pieces, {v['useful_tokens']:,} useful tokens in "
          f"{v['steps']} optimizer steps; padded: B={work.batch} pieces per step; varlen: {work.capacity} tokens "
          f"per step" + (f" in rows of <= {work.varlen_row_capacity}" if work.varlen_row_capacity else " in one row")
          + f"; HF packed: rows of <= {work.row_capacity} tokens ===")
    head = (f"{'method':38} {'dtype':8} {'micro':>5} {'useful%':>7} {'pad FLOP%':>9} {'time s':>7} "
            f"{'useful tok/s':>12} {'min-max':>13} {'varlen x':>8} {'MFU':>6} {'peak RSS':>8} {'+RSS':>7} "
            f"{'faults/step':>11} {'other CPU':>9}")
    print(head)
    print("-" * len(head))
    for dtype, rows in by_dtype.items():
        for method, r in rows.items():
            name = LABELS[method] + (" INVALID" if is_invalid(r) else "")
            shape = f"{name:38} {dtype:8} {r['micro_batches']:>5} {100 * r['useful_token_share']:>6.1f}% " \
                    f"{100 * r['padding_flop_share']:>8.1f}%"
            if "error" in r:
                print(f"{shape} FAILED: {r['error']}")
                continue
            # No ratio where varlen's own run failed.
            speedup = f"{r['varlen_speedup']:>7.2f}x" if "varlen_speedup" in r else f"{'-':>8}"
            print(f"{shape} {r['seconds']:>7.1f} {r['useful_tokens_per_s']:>12,.0f} {spread(r):>13} "
                  f"{speedup} {100 * r['mfu']:>5.1f}% {gib(r['peak_rss_bytes']):>8} "
                  f"{gib(r['peak_rss_bytes'] - r['rss_before_training_bytes']):>7} "
                  f"{gib(r['page_fault_bytes_per_step']):>11} {r['other_cpu_cores']:>8.2f}c")
    busy = [f"{d} {m}" for d, rows in by_dtype.items() for m, r in rows.items() if r.get("other_cpu_cores", 0) > 0.2]
    if busy:
        print(f"WARNING: other processes used > 0.2 cores while timing {', '.join(busy)}: those rates are low")
    if w := first_with(by_dtype, "hf_padded", "weights_check_max_abs_diff"):
        print(f"weight copy check (float32): varlen vs HF padded logits on {len(work.check_row)} pieces, max abs "
              f"diff {w['weights_check_max_abs_diff']:.2e}")
    if k := first_with(by_dtype, "hf_packed", "single_piece_row_token_share"):
        print(f"HF packed rows: {100 * k['single_piece_row_token_share']:.0f}% of useful tokens sit in "
              f"rows of a single piece (plain causal attention, the same work as varlen's); the rest in rows "
              f"of several pieces, where HF attends through a block-diagonal (T, T) mask")
    if k := first_with(by_dtype, "hf_packed", "packed_check"):
        c = k["packed_check"]
        verdict = "documents kept apart" if c["valid"] else "INVALID: cross-document attention"
        print(f"HF packed check before timing (float32; row of {c['pieces']} pieces, {c['tokens']} tokens): max abs "
              f"diff vs per-document runs {c['max_abs_diff']:.2e} (same row without position_ids: "
              f"{c['max_abs_diff_without_position_ids']:.2e}) -> {verdict}")


def evaluate_targets(results: dict[int, dict[str, dict[str, dict]]]) -> list[dict]:
    """The targets per seq_len and dtype, varlen against the HF method in the same dtype: issue 3's (over
    (i), (ii), (iii)) and issue 15's (1.1x over (iii) at every seq_len, 2.5x over (i) at 8192)."""
    out = []
    for seq_len, by_dtype in results.items():
        for dtype, rows in by_dtype.items():
            def add(issue: int, target: str, value: str, ok: bool) -> None:
                out.append({"seq_len": seq_len, "dtype": dtype, "issue": issue, "target": target, "value": value,
                            "pass": ok})
            p, g, k = rows.get("hf_padded", {}), rows.get("hf_grouped", {}), rows.get("hf_packed", {})
            k_note = " (iii INVALID)" if is_invalid(k) else ""
            if "varlen_speedup" in p:
                ideal = p["computed_flops"] / p["useful_flops"]
                reached = p["varlen_speedup"] / ideal
                add(3, "speed-up over (i) >= 90% of ideal",
                    f"{p['varlen_speedup']:.2f}x of ideal {ideal:.2f}x = {100 * reached:.0f}%", reached >= 0.9)
            if "varlen_speedup" in g:
                add(3, "speed-up over (ii) >= 1.0x", f"{g['varlen_speedup']:.2f}x", g["varlen_speedup"] >= 1.0)
            if "varlen_speedup" in k and seq_len >= 8192:
                add(3, "speed-up over (iii) >= 2x at 8192", f"{k['varlen_speedup']:.2f}x" + k_note,
                    k["varlen_speedup"] >= 2.0)
            if "varlen_speedup" in k:
                add(15, "speed-up over (iii) >= 1.1x", f"{k['varlen_speedup']:.2f}x" + k_note,
                    k["varlen_speedup"] >= 1.1)
            if "varlen_speedup" in p and seq_len >= 8192:
                add(15, "speed-up over (i) >= 2.5x at 8192", f"{p['varlen_speedup']:.2f}x",
                    p["varlen_speedup"] >= 2.5)
    return out


def plot(results: dict[int, dict[str, dict[str, dict]]], path: Path, corpus: str) -> None:
    """One panel per dtype, one bar group per seq_len; whiskers span the min-max over repeats."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seq_lens = list(results)
    dtypes = list(results[seq_lens[0]])
    methods = [m for m in METHODS if any(m in results[s][d] for s in seq_lens for d in dtypes)]
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(2 + 7 * len(dtypes), 4.8), sharey=True, squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        for i, m in enumerate(methods):
            rows = [results[s][dtype].get(m, {}) for s in seq_lens]
            xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(seq_lens))]
            ys = [r.get("useful_tokens_per_s", 0) for r in rows]
            whiskers = [[y - r.get("useful_tokens_per_s_min", y) for y, r in zip(ys, rows)],
                        [r.get("useful_tokens_per_s_max", y) - y for y, r in zip(ys, rows)]]
            invalid = any(is_invalid(r) for r in rows)
            bars = ax.bar(xs, ys, width, yerr=whiskers, capsize=2, label=LABELS[m] + (" INVALID" if invalid else ""),
                          hatch="//" if invalid else None)
            for bar, r in zip(bars, rows):
                note = f"{r['varlen_speedup']:.2f}x" if "varlen_speedup" in r else "failed"
                if m != "varlen":  # above the whisker, where it cannot hide behind it
                    top = r.get("useful_tokens_per_s_max", bar.get_height())
                    ax.annotate(note, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                                fontsize=8)
        ax.set_xticks(range(len(seq_lens)), [f"max_seq_len {s}" for s in seq_lens])
        ax.set_title(dtype + (" (autocast, float32 weights)" if dtype == "bfloat16" else ""), fontsize=10)
    axes[0][0].set_ylabel("useful (non-pad) tokens / s")
    axes[0][0].legend(fontsize=8)  # the same methods and colours in every panel
    fig.suptitle(f"Training throughput, {corpus} corpus, CPU (bar labels: varlen speed-up over that method)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-lens", default="2048,8192", help="comma-separated max_seq_len values")
    ap.add_argument("--steps", default="3,2", help="timed optimizer steps: one value, or one per seq len")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma-separated: float32 (no autocast), bfloat16 (bf16 autocast, float32 weights and "
                         "AdamW state); every (method, seq_len) runs once per dtype")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of every (method, dtype) per seq len, interleaved; rows report the median "
                         "useful tokens/s and the min-max")
    ap.add_argument("--batch", type=int, default=16, help="pieces per padded batch (B)")
    ap.add_argument("--warmup-pieces", type=int, default=4,
                    help="pieces outside the timed set, run untimed first by every method")
    ap.add_argument("--max-micro-tokens", type=int, default=32768,
                    help="padded tokens per HF forward; a larger padded batch runs as chunks of its rows")
    ap.add_argument("--packed-row-capacity", type=int, default=0,
                    help="tokens per HF padding-free row (0 = max_seq_len); HF builds a dense T x T mask per row")
    ap.add_argument("--varlen-row-capacity", type=int, default=DataConfig().row_tokens,
                    help="rows of at most this many tokens, gradient-accumulated (default: varlen's "
                         "data.row_tokens); 0 = one varlen row per optimizer step")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--profile", action="store_true",
                    help="run the timed steps under torch.profiler (slower) and write op tables to --out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mem-limit-gib", type=float, default=18.0, help="address-space cap per worker process")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-kv-head", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default="stdlib",
                    help="stdlib | short (benchmarks/short_docs.py's one document per top-level def/class) | "
                         "DIR | FILE.jsonl | FILE.parquet, as varlen train's --data.corpus")
    ap.add_argument("--glob", default=Corpus().glob, help="files read from a --corpus directory")
    ap.add_argument("--cache-dir", default=None, help="token store cache (default $VARLEN_CACHE)")
    ap.add_argument("--out", default="benchmarks/results", help="directory for the JSON and PNG")
    return ap.parse_args()


def load_corpus(args: argparse.Namespace) -> Corpus:
    """`short`: benchmarks/short_docs.py's corpus, kept (and built on first use) where dd_vs_concat.py keeps
    it; anything else as `varlen train` reads --data.corpus and --data.glob."""
    if args.corpus == "short":
        cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        return Corpus(str(build_short_docs(cache / "dd_vs_concat").path))
    return Corpus(args.corpus, glob=args.glob)


def run_repeats(work: Workload, methods: list[str], dtypes: list[str], args: argparse.Namespace,
                out: Path) -> dict[str, dict[str, list[dict]]]:
    """dtype -> method -> its runs at one seq_len. Interleaved (each repeat runs every dtype's methods in turn)
    so that a slow spell of the machine lands on all of them rather than on one. A failed run (out of memory,
    say) would fail again: it is not repeated."""
    runs: dict[str, dict[str, list[dict]]] = {d: {m: [] for m in methods} for d in dtypes}
    for rep in range(args.repeats):
        for dtype in dtypes:
            for method in methods:
                done = runs[dtype][method]
                if done and "error" in done[-1]:
                    continue
                t0 = time.perf_counter()
                r = run_isolated(method, work, dtype, args)
                done.append(r)
                if "profile" in r:
                    suffix = f"_r{rep + 1}" if args.repeats > 1 else ""
                    (out / f"profile_{work.seq_len}_{dtype}_{method}{suffix}.txt").write_text(r.pop("profile"))
                status = f"FAILED {r['error']}" if "error" in r else f"{r['seconds']:.1f}s timed"
                print(f"  [{work.seq_len} {dtype} {rep + 1}/{args.repeats}] {method}: {status}, "
                      f"{time.perf_counter() - t0:.0f}s in all (load avg before timing "
                      f"{r.get('load_avg_1min_before', float('nan')):.2f})", flush=True)
    return runs


def main() -> None:
    args = parse_args()
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    steps = steps * len(seq_lens) if len(steps) == 1 else steps
    if len(steps) != len(seq_lens):
        raise SystemExit("--steps takes one value or one per --seq-lens entry")
    methods = [m for m in args.methods.split(",") if m]
    if "varlen" not in methods or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods must include varlen and be drawn from {', '.join(METHODS)}")
    dtypes = list(dict.fromkeys(d for d in args.dtypes.split(",") if d))
    if not dtypes or not set(dtypes) <= set(DTYPES):
        raise SystemExit(f"--dtypes takes a comma-separated subset of {', '.join(DTYPES)}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    info = machine_info(args.threads)
    corpus = load_corpus(args)
    tokenizer, store = prepare(corpus, args.vocab, args.cache_dir)
    peaks_before = matmul_peaks(dtypes, args.threads)
    print(f"date {info['date']} | CPU {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB)"
          f" | matrix units: {matrix_units(info)} | torch {info['torch']}, transformers {info['transformers']}, "
          f"python {info['python']} | {args.threads} threads | load avg {os.getloadavg()[0]:.2f}")
    print(f"corpus {args.corpus}" + (f" ({corpus.spec})" if corpus.spec != args.corpus else "")
          + f": {store.num_docs:,} documents, {store.num_tokens:,} tokens, BPE vocab {tokenizer.vocab_size}")
    print(f"timing: forward+backward+clip+AdamW per optimizer step in {', '.join(dtypes)} (bfloat16 = bf16 "
          f"autocast, float32 weights and AdamW state, in every method); timed steps per seq len "
          f"{dict(zip(seq_lens, steps))} after an untimed warm-up on {args.warmup_pieces} other pieces; each "
          f"(method, seq_len, dtype) {args.repeats}x, interleaved, each run in a fresh process; inputs built "
          f"before the clock starts" + ("; UNDER torch.profiler (times inflated)" if args.profile else ""))
    print(f"dense matmul 2048x2048 at {args.threads} threads: {gflops(peaks_before)}", flush=True)

    workloads: dict[int, Workload] = {}
    runs: dict[int, dict[str, dict[str, list[dict]]]] = {}
    for seq_len, n_steps in zip(seq_lens, steps):
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, dim=args.dim, n_layer=args.n_layer, n_head=args.n_head,
                          n_kv_head=args.n_kv_head, max_seq_len=seq_len, attention="sdpa_docs")
        workloads[seq_len] = work = build_workload(store, cfg, args, n_steps)
        runs[seq_len] = run_repeats(work, methods, dtypes, args, out)

    peaks_after = matmul_peaks(dtypes, args.threads)
    # Each dtype's MFU against the better of its two measurements.
    peaks = {d: max(peaks_before[d], peaks_after[d]) for d in dtypes}
    results = {s: summarize(workloads[s], runs[s], peaks) for s in seq_lens}
    cfg0 = workloads[seq_lens[0]].cfg
    print(f"\ndense matmul again after the runs: {gflops(peaks_after)}; MFU uses {gflops(peaks)}")
    print(f"model: dim {cfg0.dim}, {cfg0.n_layer} layers, {cfg0.n_head} heads ({cfg0.n_kv_head} kv), ffn "
          f"{cfg0.ffn_dim}, vocab {cfg0.vocab_size}, tied embeddings {cfg0.tie_embeddings}, "
          f"{Transformer(cfg0).num_params() / 1e6:.2f}M parameters")
    print("columns: micro = forward/backward passes; useful% = non-pad share of computed tokens; pad FLOP% = share "
          "of FLOPs spent on padding (attention counted causal per row); time s and useful tok/s = the median over "
          "repeats, min-max = the spread of useful tok/s over repeats; varlen x = varlen's useful tok/s over the "
          "row's, same dtype; MFU = useful FLOP/s over the matmul FLOP/s of the row's dtype; peak RSS = the "
          "worker's high-water mark; +RSS = peak minus RSS after setup; faults/step = memory handed over by the "
          "kernel per step (minor page faults x page size); other CPU = cores busy with other processes while "
          "timing (the most of any repeat)")
    for seq_len in seq_lens:
        print_table(workloads[seq_len], results[seq_len])

    print("\ntargets:")
    verdicts = evaluate_targets(results)
    for t in verdicts:
        where = f"[{t['seq_len']} {t['dtype']}]"
        print(f"  {where:16} {t['target']:36} {t['value']:34} {'PASS' if t['pass'] else 'FAIL'}  (issue {t['issue']})")

    report = {"machine": info, "args": vars(args),
              "matmul_flops": {d: {"before": peaks_before[d], "after": peaks_after[d]} for d in dtypes},
              "model": asdict(cfg0), "targets": verdicts,
              "results": {str(s): {"capacity": workloads[s].capacity, "batch": workloads[s].batch,
                                   "packed_row_capacity": workloads[s].row_capacity,
                                   "rows": [row for rows in results[s].values() for row in rows.values()]}
                          for s in seq_lens}}
    (out / "train_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(results, out / "train_throughput.png", args.corpus)
    print(f"\nwrote {out / 'train_throughput.json'} and {out / 'train_throughput.png'}")


if __name__ == "__main__":
    main()
