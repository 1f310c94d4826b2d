"""The serving engine eager (packed weights) vs compiled (`--compile`), in one process, on the serve_engines model.

Both engines serve the same seeded SmolLM-135M-shape model (built and cached by serve_engines.py) in the same
dtype. Each round times, for each engine in turn: batch-1 decode steps, 16-way decode steps (of equal contexts,
and of contexts spread like serve_engines' workload) and one prefill chunk; rounds interleave the engines so
drift of a shared machine hits both alike, and medians are reported with each engine's spread. No HTTP:
`Engine.step` in a loop, so this isolates the forward. The greedy tokens of a few requests are compared between
the two engines at the end.

    .venv/bin/python benchmarks/serve_compile.py [--dtype auto] [--quantization none|int8] [--rounds 3]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from machine import machine_info, matrix_units
from serve_engines import SMOLLM, TINY, build_model, build_tokenizer, stdlib_texts


def timed_steps(engine, prompts: list[list[int]], steps: int) -> float:
    """Seconds per decode step with these prompts running (prefilled and two steps in first, untimed)."""
    from varlen.serve.request import SamplingParams
    # Room for every prompt's prefill steps too: nobody finishes before the timed steps end.
    params = SamplingParams(max_tokens=steps + 8 + sum(map(len, prompts)) // 64, temperature=0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while any(engine.requests[r].num_computed < len(engine.requests[r].prompt_ids) for r in ids):
        engine.step()
    for _ in range(2):
        engine.step()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t) / steps
    for r in ids:
        engine.abort(r)
    return dt


def prefill_chunk(engine, prompt: list[int]) -> float:
    from varlen.serve.request import SamplingParams
    r = engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    t = time.perf_counter()
    engine.step()
    dt = time.perf_counter() - t
    if r in engine.requests:
        engine.abort(r)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="auto", help="serving dtype of both engines (default auto)")
    ap.add_argument("--quantization", default="none", choices=["none", "int8"],
                    help="weights of both engines (default none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512, help="tokens of the timed prefill chunk")
    ap.add_argument("--tiny", action="store_true", help="a small model for a quick smoke run")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "varlen" / "bench"))
    args = ap.parse_args()

    from varlen.checkpoint import load_model
    from varlen.config import ServeConfig
    from varlen.serve.engine import Engine
    from varlen.serve.request import SamplingParams

    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    print(f"date {info['date']} | CPU {info['cpu']} ({info['logical_cpus']} logical CPUs) | matrix units: "
          f"{matrix_units(info)} | torch {info['torch']}, {args.threads} threads")
    shape = TINY if args.tiny else SMOLLM
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(shape, work, stdlib_texts())
    hf_dir, meta = build_model(shape, 0, 5.0, work, tok)
    model, _, tokenizer = load_model(hf_dir)
    print(f"model {hf_dir} ({meta['params'] / 1e6:.1f} M parameters), dtype {args.dtype}, "
          f"quantization {args.quantization}, "
          f"max_num_seqs 16, kv_cache 1 GiB")
    engines = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        t = time.perf_counter()
        engines[name] = Engine(copy.deepcopy(model), tokenizer,
                               ServeConfig(kv_cache_gib=1.0, max_num_seqs=16, dtype=args.dtype, compile=compile_,
                                           quantization=args.quantization))
        print(f"{name}: built in {time.perf_counter() - t:.1f} s ({engines[name].precision.reason}); "
              f"compiled forward: {'yes' if engines[name].runner.step_fn else 'no'}", flush=True)

    g = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size

    def prompt(n: int) -> list[int]:
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    mixed = "16-way decode, mixed contexts"
    times = {name: {"batch-1 decode step": [], "16-way decode step": [], mixed: [],
                    f"{args.prefill}-token prefill": []} for name in engines}
    for rnd in range(args.rounds):
        for name, eng in engines.items():
            t = times[name]
            t["batch-1 decode step"].append(timed_steps(eng, [prompt(66)], 20))
            t["16-way decode step"].append(timed_steps(eng, [prompt(66) for _ in range(16)], 8))
            # Contexts spread as the serve_engines workload's are (prompts of 9-725 tokens).
            lens = torch.randint(9, 726, (16,), generator=g).tolist()
            t[mixed].append(timed_steps(eng, [prompt(n) for n in lens], 8))
            t[f"{args.prefill}-token prefill"].append(prefill_chunk(eng, prompt(args.prefill)))
        print(f"round {rnd + 1}/{args.rounds} done", flush=True)

    print(f"\n{'ms (median of ' + str(args.rounds) + ' rounds, min-max)':<34}" +
          "".join(f"{n:>22}" for n in engines) + f"{'compiled speed-up':>20}")
    for what in times["eager"]:
        cells = []
        for name in engines:
            v = [x * 1000 for x in times[name][what]]
            cells.append(f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})")
        ratio = statistics.median(times["eager"][what]) / statistics.median(times["compiled"][what])
        print(f"{what:<34}" + "".join(f"{c:>22}" for c in cells) + f"{ratio:>19.2f}x")

    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    batch = [prompt(int(n)) for n in torch.randint(10, 300, (6,), generator=g)]
    outs = {name: [c[0].token_ids for c in eng.generate(batch, params)] for name, eng in engines.items()}
    same = sum(a == b for a, b in zip(outs["eager"], outs["compiled"]))
    print(f"greedy, 6 prompts x 32 tokens: {same}/6 identical between eager and compiled")


if __name__ == "__main__":
    main()
