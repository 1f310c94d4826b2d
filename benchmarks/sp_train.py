"""Issue 16: sequence parallelism planned per step (adaptive, FlexSP-style) against static sequence parallelism
and against data parallelism with documents cut to what one rank holds.

Part 1, real runs: `varlen train --nproc 2` (torchrun, gloo, one thread per rank) on the stdlib corpus, a small
model, at each --contexts C, the same tokens per step (2 x C) in every configuration:

  adaptive   --model.max_seq_len C   --data.rank_tokens C/2 --dist.sp auto   documents up to C tokens whole
  static     --model.max_seq_len C   --data.rank_tokens C/2 --dist.sp 2      every row split over both ranks
  dp         --model.max_seq_len C/2 --data.rank_tokens C/2 --dist.sp off    documents cut at C/2 tokens
  single     --nproc 1, --model.max_seq_len C, --data.rank_tokens 0          one process, the memory reference

s/step is the median of the per-step training times in metrics.jsonl (differences of `time`, the max over
ranks), the first step left out. Peak RSS per rank: psutil polls the process tree while a run lasts and keeps
the largest RSS of each rank process (told apart by its RANK environment variable). The full-context share
(tokens trained with their whole preceding document in context) is computed from the token store's document
lengths (framed, as the loader trains them): full_context_share(lengths, C) where documents up to C train
whole, full_context_share(lengths, C/2) for dp. Issue 16's memory target: peak RSS per rank at most 0.6 x a
single process's at the same context.

Part 2, simulation (pure, varlen.data.sp_plan): steps of stdlib documents cut at max_seq_len (16k, 32k),
sampled at random, about ranks x rank_tokens tokens each (rank_tokens = max_seq_len / 2), planned for 8, 16
and 64 ranks with a FLOP cost model of a SmolLM-135M-like shape (dim 576, 30 layers, 8 heads of 72, 4 KV
heads, vocabulary 49,152; 8 heads instead of SmolLM's 9 so that Ulysses degrees 2, 4, 8 divide them). The
mean makespan over the steps, for: adaptive (mode auto, degrees: powers of two dividing ranks and n_head, as
`--dist.sp auto` uses), static SP at the smallest degree holding the longest piece, static SP at the largest
degree Ulysses allows (min(ranks, n_head)), and dp (pieces cut again at rank_tokens, mode dp). With c = 0 (free
communication) and with c estimated from an assumed interconnect (printed with its assumptions).

    .venv/bin/python benchmarks/sp_train.py                       # 16k only, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/sp_train.py --contexts 16384,32768
    .venv/bin/python benchmarks/sp_train.py --cost-model cost.json   # real runs plan by `varlen bench calibrate`
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from machine import machine_info, matrix_units
from varlen.config import ModelConfig
from varlen.data.balance import CostModel
from varlen.data.corpus import Corpus
from varlen.data.sp_plan import SPCost, cut_to_cap, full_context_share, plan_step

MODEL = {"model.dim": "128", "model.n_layer": "2", "model.n_head": "4", "model.n_kv_head": "2"}
PAPERS = ("Reported by the papers (not measured here): FlexSP reports up to 1.98x over static sequence "
          "parallelism; Zeppelin reports 2.8x on average.")

# Simulation: a SmolLM-135M-like shape with a power-of-two head count (see the module docstring).
SIM_MODEL = ModelConfig(vocab_size=49152, dim=576, n_layer=30, n_head=8, n_kv_head=4, ffn_hidden=1536)
# Communication assumptions for c (stated in the output): bf16 activations; Ulysses moves q, k, v before
# attention and the output after it (4 all-to-alls a layer, k and v at n_kv_head heads), forward and
# backward (the backward moves the gradients of the same tensors); each rank sustains BW bytes/s of
# all-to-all and FLOPS of training compute (so c can be stated in the cost model's unit, FLOPs).
SIM_BW = 50e9       # bytes/s per rank: 400 Gb/s InfiniBand, between nodes
SIM_FLOPS = 200e12  # achieved bf16 FLOP/s per rank (an H100 at ~20% of its dense peak)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f}"


def doc_lengths() -> np.ndarray:
    """Every stdlib document's length as the loader trains it (framed: BOS + text + EOD), from the token
    store `varlen train` uses (tokenized now if not cached)."""
    from varlen.data.tokens import prepare
    _, store = prepare(Corpus("stdlib"), ModelConfig().vocab_size, log=lambda m: print(m, file=sys.stderr))
    return store.lengths.astype(np.int64)


# ---------------------------------------------------------------- part 1: real runs

def configs(context: int) -> dict[str, tuple[int, list[str]]]:
    """name -> (processes, options) for one context."""
    half = str(context // 2)
    return {
        "adaptive": (2, ["--model.max_seq_len", str(context), "--data.rank_tokens", half, "--dist.sp", "auto"]),
        "static": (2, ["--model.max_seq_len", str(context), "--data.rank_tokens", half, "--dist.sp", "2"]),
        "dp": (2, ["--model.max_seq_len", half, "--data.rank_tokens", half, "--dist.sp", "off"]),
        "single": (1, ["--model.max_seq_len", str(context), "--data.rank_tokens", "0"]),
    }


def watch_rss(proc: subprocess.Popen, peaks: dict[str, int], stop: threading.Event) -> None:
    """Largest RSS of each process in proc's tree, keyed by its RANK variable ('main' without one)."""
    root = psutil.Process(proc.pid)
    while not stop.is_set():
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                key = p.environ().get("RANK", "main")
                if key == "main" and p.pid != root.pid:
                    continue  # torchrun's helpers; the rank processes carry RANK
                peaks[key] = max(peaks.get(key, 0), p.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        stop.wait(0.1)


def run(out: Path, nproc: int, opts: list[str], context: int, steps: int,
        extra: list[str]) -> tuple[list[str], list[dict], dict]:
    cmd = [sys.executable, "-m", "varlen", "train", "--nproc", str(nproc), "--out", str(out), "--no-progress",
           "--train.threads", "1", "--train.dtype", "float32", "--train.max_steps", str(steps),
           "--train.eval_every", "0", "--train.ckpt_every", "0", "--train.warmup_steps", "1",
           "--data.tokens_per_step", str(2 * context)]
    for k, v in MODEL.items():
        cmd += [f"--{k}", v]
    cmd += opts + extra
    print(f"  [{load()}] $ {' '.join(cmd)}", flush=True)
    peaks: dict[str, int] = {}
    stop = threading.Event()
    log = (out.parent / f"{out.name}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    watcher = threading.Thread(target=watch_rss, args=(proc, peaks, stop), daemon=True)
    watcher.start()
    rc = proc.wait()
    stop.set()
    watcher.join()
    log.close()
    if rc:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); see {out.parent / (out.name + '.log')}:\n"
                           + (out.parent / f"{out.name}.log").read_text()[-2000:])
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return cmd, rows, peaks


def real_runs(contexts: list[int], steps: int, lengths: np.ndarray, tmp: Path,
              extra: list[str]) -> tuple[list[dict], list[str]]:
    results, commands = [], []
    hdr = (f"{'context':>7} {'config':>9} {'s/step':>7} {'steps(s)':>24} {'peak RSS/rank MiB':>18} "
           f"{'x single':>8} {'full-ctx share':>14} {'SP steps':>8}  load")
    for context in contexts:
        print(f"context {context}:")
        rows_out = []
        for name, (nproc, opts) in configs(context).items():
            cmd, rows, peaks = run(tmp / f"{context}-{name}", nproc, opts, context, steps, extra)
            commands.append(" ".join(cmd))
            t = np.diff([0.0] + [r["time"] for r in rows])[1:]
            rank_rss = {k: v for k, v in peaks.items() if k != "main"} or peaks
            seq_cap = context // 2 if name == "dp" else context
            sp_steps = sum(1 for r in rows[1:] if max(r.get("sp_degrees", [1])) > 1)
            rows_out.append({"context": context, "config": name, "nproc": nproc, "command": " ".join(cmd),
                             "seconds_per_step": float(np.median(t)), "step_seconds": t.tolist(),
                             "peak_rss_mib": {k: v / 2 ** 20 for k, v in sorted(rank_rss.items())},
                             "full_context_share": full_context_share(lengths.tolist(), seq_cap),
                             "sp_degrees": [r.get("sp_degrees") for r in rows],
                             "rank_tokens": [r.get("rank_tokens") for r in rows],
                             "tokens": [r["tokens"] for r in rows], "loss_last": rows[-1]["loss"],
                             "split_steps": sp_steps, "load_after": load()})
            print(f"  done {name}: {np.median(t):.2f} s/step, peak RSS {rows_out[-1]['peak_rss_mib']}", flush=True)
        single = max(next(r for r in rows_out if r["config"] == "single")["peak_rss_mib"].values())
        print(hdr)
        for r in rows_out:
            rss = max(r["peak_rss_mib"].values())
            r["rss_vs_single"] = rss / single
            sp = f"{sum(1 for d in r['sp_degrees'][1:] if d and max(d) > 1)}/{len(r['sp_degrees']) - 1}"
            print(f"{context:>7} {r['config']:>9} {r['seconds_per_step']:>7.2f} "
                  f"{' '.join(f'{x:.1f}' for x in r['step_seconds']):>24} "
                  f"{'/'.join(f'{v:.0f}' for v in r['peak_rss_mib'].values()):>18} {r['rss_vs_single']:>8.2f} "
                  f"{r['full_context_share']:>14.3f} {sp:>8}  {r['load_after']}")
        results += rows_out
    return results, commands


# ---------------------------------------------------------------- part 2: simulation

def comm_c(cfg: ModelConfig) -> tuple[float, str]:
    """c of SPCost in FLOP-equivalents per token leaving a rank, and the assumptions behind it."""
    per_token_bytes = cfg.n_layer * 2 * (2 * cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim * 2
    c = per_token_bytes / SIM_BW * SIM_FLOPS
    note = (f"c = {cfg.n_layer} layers x 2 (fwd+bwd) x (q {cfg.n_head} + k {cfg.n_kv_head} + v {cfg.n_kv_head} + "
            f"out {cfg.n_head} heads) x head_dim {cfg.head_dim} x 2 bytes = {per_token_bytes:,} bytes per token "
            f"leaving a rank; at an assumed {SIM_BW / 1e9:.0f} GB/s all-to-all per rank and {SIM_FLOPS / 1e12:.0f} "
            f"TFLOP/s achieved per rank: c = {c:,.0f} FLOP-equivalents per token (the per-token compute a is "
            f"{CostModel.from_flops(cfg).a:,.0f} FLOPs)")
    return c, note


def sample_steps(pieces: np.ndarray, tokens: int, n: int, rng: np.random.Generator) -> list[list[int]]:
    """n steps of pieces drawn at random without replacement within a step, each until it holds >= tokens."""
    steps = []
    for _ in range(n):
        order = rng.permutation(len(pieces))
        cum = np.cumsum(pieces[order])
        k = int(np.searchsorted(cum, tokens)) + 1
        steps.append([int(x) for x in pieces[order[:k]]])
    return steps


def simulate(lengths: np.ndarray, contexts: list[int], rank_counts: list[int], n_steps: int, seed: int) -> tuple[list[dict], str]:
    cost = CostModel.from_flops(SIM_MODEL)
    c_est, note = comm_c(SIM_MODEL)
    print(f"simulation model: {SIM_MODEL.dim} dim, {SIM_MODEL.n_layer} layers, {SIM_MODEL.n_head} heads "
          f"(head_dim {SIM_MODEL.head_dim}), {SIM_MODEL.n_kv_head} KV heads, ffn {SIM_MODEL.ffn_dim}, vocab "
          f"{SIM_MODEL.vocab_size}; cost(L) = {cost.a:,.0f} L + {cost.b:,.0f} L^2 FLOPs (fwd+bwd)")
    print(f"communication: {note}")
    print(f"{'context':>7} {'ranks':>5} {'c':>10} {'adaptive':>9} {'static-min':>10} {'static-max':>10} {'dp':>9} "
          f"{'static-min/adapt':>16} {'static-max/adapt':>16} {'dp/adapt':>8}  (mean makespan, ms at assumed FLOP/s)")
    results = []
    for context in contexts:
        cap = context // 2
        pieces = np.array(cut_to_cap(lengths.tolist(), context))
        for ranks in rank_counts:
            rng = np.random.default_rng(seed)
            steps = sample_steps(pieces, ranks * cap, n_steps, rng)
            degrees = tuple(d for d in (2 ** i for i in range(ranks.bit_length()))
                            if ranks % d == 0 and SIM_MODEL.n_head % d == 0)
            static_min = min(d for d in degrees if d * cap >= context)
            static_max = max(degrees)
            for c in (0.0, c_est):
                sp = SPCost.from_cost(cost, c)
                spans: dict[str, list[float]] = {"adaptive": [], "static_min": [], "static_max": [], "dp": []}
                auto_degrees = []
                for ls in steps:
                    p = plan_step(ls, ranks, sp, cap, degrees, mode="auto")
                    spans["adaptive"].append(p.makespan(ls, sp))
                    auto_degrees.append(sorted(p.degrees, reverse=True))
                    for name, d in (("static_min", static_min), ("static_max", static_max)):
                        spans[name].append(plan_step(ls, ranks, sp, cap, degrees, "static", d).makespan(ls, sp))
                    cut = cut_to_cap(ls, cap)
                    spans["dp"].append(plan_step(cut, ranks, sp, cap, mode="dp").makespan(cut, sp))
                ms = {k: 1e3 * float(np.mean(v)) / SIM_FLOPS for k, v in spans.items()}
                r = {"context": context, "ranks": ranks, "rank_tokens": cap, "c": c, "steps": n_steps,
                     "tokens_per_step": float(np.mean([sum(s) for s in steps])),
                     "pieces_per_step": float(np.mean([len(s) for s in steps])),
                     "static_min_degree": static_min, "static_max_degree": static_max,
                     "mean_makespan_ms": ms,
                     "auto_sp_steps": sum(1 for d in auto_degrees if d[0] > 1),
                     "auto_degrees_example": auto_degrees[:3],
                     "static_min_over_adaptive": ms["static_min"] / ms["adaptive"],
                     "static_max_over_adaptive": ms["static_max"] / ms["adaptive"],
                     "dp_over_adaptive": ms["dp"] / ms["adaptive"]}
                results.append(r)
                print(f"{context:>7} {ranks:>5} {c:>10,.0f} {ms['adaptive']:>9.1f} {ms['static_min']:>10.1f} "
                      f"{ms['static_max']:>10.1f} {ms['dp']:>9.1f} {r['static_min_over_adaptive']:>16.3f} "
                      f"{r['static_max_over_adaptive']:>16.3f} {r['dp_over_adaptive']:>8.3f}  "
                      f"(static degrees {static_min}/{static_max}, {r['pieces_per_step']:.0f} pieces/step, "
                      f"auto split rows in {r['auto_sp_steps']}/{n_steps} steps)", flush=True)
    return results, note


def plot(sim: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    contexts = sorted({r["context"] for r in sim})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    colors = {"adaptive": "C0", "static_min": "C1", "static_max": "C2", "dp": "C3"}
    for ax, context in zip(axes[0], contexts):
        for c_zero, style in ((True, "-"), (False, "--")):
            rows = sorted((r for r in sim if r["context"] == context and (r["c"] == 0) == c_zero), key=lambda r: r["ranks"])
            for k, col in colors.items():
                ax.plot([r["ranks"] for r in rows], [r["mean_makespan_ms"][k] for r in rows], style, color=col,
                        marker="o", label=f"{k} ({'c=0' if c_zero else 'c est.'})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("ranks")
        ax.set_ylabel("mean step makespan (ms, assumed FLOP/s)")
        ax.set_title(f"planner simulation, stdlib pieces <= {context}, rank_tokens {context // 2}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="16384", help="real runs, comma-separated (e.g. 16384,32768)")
    ap.add_argument("--steps", type=int, default=6, help="training steps per real run; the first is left out")
    ap.add_argument("--sim-contexts", default="16384,32768")
    ap.add_argument("--sim-ranks", default="8,16,64")
    ap.add_argument("--sim-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--cost-model", help="a `varlen bench calibrate` file for the real runs' planning and "
                    "balancing (default: the FLOP cost model)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="sp_train")
    args = ap.parse_args()
    started = time.time()
    info = machine_info(threads=1, packages=())
    print(f"{info['date']} | {info['cpu']}, {info['logical_cpus']} cpus, {info['memory_gib']} GiB | matrix units: "
          f"{matrix_units(info)} | torch {info['torch']} | python {info['python']} | {load()}")
    print(f"$ {' '.join([sys.executable] + sys.argv)}")
    lengths = doc_lengths()
    print(f"stdlib token store: {len(lengths):,} documents, {int(lengths.sum()):,} tokens (framed), "
          f"p50 {int(np.median(lengths)):,}, p90 {int(np.percentile(lengths, 90)):,}, max {int(lengths.max()):,}")
    for ctx in sorted({int(x) for x in (args.contexts + "," + args.sim_contexts).split(",")}):
        print(f"  full-context share: documents whole up to {ctx:,}: {full_context_share(lengths.tolist(), ctx):.3f}; "
              f"cut at {ctx // 2:,}: {full_context_share(lengths.tolist(), ctx // 2):.3f}")
    real, commands = [], []
    if not args.skip_real:
        print(f"\nPart 1: real runs, 2 ranks (torchrun, gloo) x 1 thread, stdlib corpus, model dim 128, 2 layers, "
              f"4 heads (2 KV), float32, {args.steps} steps (median s/step over steps 2..{args.steps}), "
              f"tokens per step 2 x context")
        with tempfile.TemporaryDirectory() as tmp:
            extra = ["--data.cost_model", args.cost_model] if args.cost_model else []
            real, commands = real_runs([int(x) for x in args.contexts.split(",")], args.steps, lengths, Path(tmp),
                                       extra)
    print(f"\nPart 2: planner simulation ({args.sim_steps} sampled steps per point, seed {args.seed}) [{load()}]")
    sim, note = simulate(lengths, [int(x) for x in args.sim_contexts.split(",")],
                         [int(x) for x in args.sim_ranks.split(",")], args.sim_steps, args.seed)
    print(f"\n{PAPERS}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot(sim, out / f"{args.name}.png")
    elapsed = time.time() - started
    doc = {"machine": info, "command": " ".join([sys.executable] + sys.argv), "args": vars(args),
           "train_commands": commands, "elapsed_s": elapsed, "real": real, "simulation": sim,
           "communication_assumptions": note, "papers": PAPERS}
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [f"# sp_train ({info['date']})", "", f"{info['cpu']}; matrix units: {matrix_units(info)}; torch {info['torch']}",
          "", f"`{doc['command']}` ({elapsed:.0f} s)", "", "## Real runs (2 ranks x 1 thread)", "",
          "| context | config | s/step | peak RSS per rank (MiB) | x single | full-context share |",
          "|---|---|---|---|---|---|"]
    md += [f"| {r['context']} | {r['config']} | {r['seconds_per_step']:.2f} | "
           f"{' / '.join(f'{v:.0f}' for v in r['peak_rss_mib'].values())} | {r['rss_vs_single']:.2f} | "
           f"{r['full_context_share']:.3f} |" for r in real]
    md += ["", "## Planner simulation (mean makespan, ms at the assumed FLOP/s)", "", note, "",
           "| context | ranks | c | adaptive | static-min | static-max | dp | static-min/adaptive | static-max/adaptive | dp/adaptive |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['context']} | {r['ranks']} | {r['c']:,.0f} | {r['mean_makespan_ms']['adaptive']:.1f} | "
           f"{r['mean_makespan_ms']['static_min']:.1f} (d={r['static_min_degree']}) | "
           f"{r['mean_makespan_ms']['static_max']:.1f} (d={r['static_max_degree']}) | {r['mean_makespan_ms']['dp']:.1f} | "
           f"{r['static_min_over_adaptive']:.3f} | {r['static_max_over_adaptive']:.3f} | {r['dp_over_adaptive']:.3f} |"
           for r in sim]
    md += ["", PAPERS, "", "Commands:", ""] + [f"    {c}" for c in commands]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / (args.name + '.json')}, {out / (args.name + '.md')}, {png} ({elapsed:.0f} s)")


if __name__ == "__main__":
    main()
