"""Speculative decoding with a model's MTP heads against ordinary decoding: the same engine, the same greedy
requests, one process.

For each batch size (max_num_seqs; 1 = requests one after another) the engine runs the same prompts twice,
without and with --speculative, and reports generated tokens per second, engine steps, and for speculation the
mean tokens per verify step and the acceptance rate of each head. Greedy outputs must be equal token for token
(checked; a difference would be a float near-tie between two equally exact forwards, and is reported).

Prompts are the starts of stdlib .py files (seeded choice), tokenized with the model's own tokenizer; EOS is
ignored, so every request generates exactly --max-tokens tokens.

    .venv/bin/python benchmarks/speculative.py --model runs/tiny_mtp                   # a run trained with heads
    .venv/bin/python benchmarks/speculative.py --model runs/tiny_mtp --requests 4 --max-tokens 16   # smoke test
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from machine import machine_info
from varlen.batch import Batch
from varlen.checkpoint import load_model
from varlen.config import DTYPE_CHOICES, QUANTIZATION_CHOICES, ServeConfig
from varlen.data.corpus import stdlib_files
from varlen.serve.engine import Engine
from varlen.serve.request import SamplingParams


def build_prompts(tok, n: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    files = [p for p in stdlib_files() if p.stat().st_size > 4 * prompt_tokens]
    chosen = random.Random(seed).sample(files, n)
    # Framed as the engine frames a text prompt (the model's BOS where it was trained with one), then cut.
    return [tok.encode_prompt(p.read_text(errors="replace"))[:prompt_tokens] for p in chosen]


def run(model, tok, prompts: list[list[int]], args, batch: int, speculative: bool) -> dict:
    cfg = ServeConfig(max_num_seqs=batch, kv_cache_gib=args.kv_cache_gib, speculative=speculative,
                      dtype=args.dtype, quantization=args.quantization, compile=args.compile,
                      adaptive_drafts=not args.fixed_drafts,
                      num_speculative=args.num_speculative if speculative else 0,
                      speculative_max_batch=args.speculative_max_batch if speculative else 0,
                      max_model_len=args.prompt_tokens + 1 + args.max_tokens)
    eng = Engine(model, tok, cfg)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    eng.generate([prompts[0][:8]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    warm = eng.spec_stats.drafted[:], eng.spec_stats.accepted[:], eng.spec_stats.verify_steps, eng.spec_stats.emitted
    outputs: dict[str, list[int]] = {}
    steps = 0
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(p, params, f"r{i}")
    while eng.has_unfinished():
        for o in eng.step():
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
        steps += 1
    seconds = time.perf_counter() - t0
    tokens = sum(len(v) for v in outputs.values())
    s = eng.spec_stats
    drafted = [a - b for a, b in zip(s.drafted, warm[0])]
    accepted = [a - b for a, b in zip(s.accepted, warm[1])]
    verify_steps, emitted = s.verify_steps - warm[2], s.emitted - warm[3]
    res = {"batch": batch, "speculative": speculative, "precision": eng.precision.reason,
           "seconds": seconds, "tokens": tokens,
           "tokens_per_s": tokens / seconds, "engine_steps": steps,
           "outputs": [outputs[f"r{i}"] for i in range(len(prompts))]}
    if speculative:
        res.update({"num_speculative": eng.num_speculative, "verify_steps": verify_steps,
                    "verify_costs": eng.verify_costs, "drafted_per_head": drafted,
                    "tokens_per_verify_step": emitted / max(verify_steps, 1),
                    "acceptance_per_head": [a / d if d else 0.0 for a, d in zip(accepted, drafted)]})
    return res


@torch.no_grad()
def head_agreement(model, prompts: list[list[int]], outputs: list[list[int]]) -> list[float]:
    """Over every generated position t of the greedy outputs: the share where heads 1..j all name the tokens
    greedy decoding produced at t+2..t+1+j (what drafting from every position would accept). Serving drafts
    only from the position where the previous verify step ended, so its acceptance can differ."""
    k = model.cfg.mtp_heads
    hits, n = [0] * k, 0
    for prompt, out in zip(prompts, outputs):
        ids = torch.tensor(prompt + out)
        _, heads = model(ids, Batch.from_seqlens([len(ids)]), heads=True)
        guess = torch.stack([h.argmax(-1) for h in heads])                 # (k, T): head j+1 at t -> t+2+j
        for t in range(len(prompt) - 1, len(ids) - 1 - k):
            n += 1
            for j in range(k):
                if int(guess[j, t]) != int(ids[t + 2 + j]):
                    break
                hits[j] += 1
    return [h / max(n, 1) for h in hits]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="varlen run/checkpoint (or HF directory) with MTP heads")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,16", help="max_num_seqs values, comma-separated")
    ap.add_argument("--num-speculative", type=int, default=0, help="drafts per step (0 = one per head)")
    ap.add_argument("--speculative-max-batch", type=int, default=0,
                    help="draft only while at most this many requests run (0 = always)")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="serving dtype (as varlen serve)")
    ap.add_argument("--quantization", default="none", choices=QUANTIZATION_CHOICES)
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward (as varlen serve --compile)")
    ap.add_argument("--fixed-drafts", action="store_true",
                    help="verify every draft (default: adaptive, as varlen serve; see speculate.draft_length)")
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "speculative.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, tok = load_model(args.model)
    if not cfg.model.mtp_heads:
        print(f"--model {args.model} has no MTP heads; train one with --model.mtp_heads 3", file=sys.stderr)
        return 2
    prompts = build_prompts(tok, args.requests, args.prompt_tokens, args.seed)
    info = machine_info(torch.get_num_threads(), packages=())
    print(json.dumps(info))
    print(f"model {args.model}: {cfg.model.n_layer} layers, dim {cfg.model.dim}, {cfg.model.mtp_heads} "
          f"{cfg.model.mtp_head} MTP heads; --dtype {args.dtype} --quantization {args.quantization}")
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        plain = run(model, tok, prompts, args, batch, speculative=False)
        precision = plain.pop("precision")
        spec = run(model, tok, prompts, args, batch, speculative=True)
        spec.pop("precision")
        print(f"precision: {precision}")
        same = sum(a == b for a, b in zip(plain["outputs"], spec["outputs"]))
        agreement = head_agreement(model, prompts, plain["outputs"])
        for r in (plain, spec):
            r.pop("outputs")
        row = {"batch": batch, "plain": plain, "speculative": spec, "outputs_equal": same == len(prompts),
               "requests_equal": same, "speedup": spec["tokens_per_s"] / plain["tokens_per_s"],
               "head_agreement_all_positions": agreement}
        results.append(row)
        ms = [1e3 * r["seconds"] / r["engine_steps"] for r in (plain, spec)]
        print(f"batch {batch:3d}: plain {plain['tokens_per_s']:8.1f} tok/s ({plain['engine_steps']} steps, "
              f"{ms[0]:.2f} ms/step), speculative {spec['tokens_per_s']:8.1f} tok/s ({spec['engine_steps']} steps, "
              f"{ms[1]:.2f} ms/step, "
              f"{spec['tokens_per_verify_step']:.2f} tokens/verify step, acceptance per head "
              + " ".join(f"{a:.2f}" for a in spec["acceptance_per_head"])
              + f"); x{row['speedup']:.2f}; outputs equal {same}/{len(prompts)}")
        print("           step cost by new tokens (timed at start): "
              + " / ".join(f"{c:.2f}" for c in spec["verify_costs"]) + "; drafts verified per head: "
              + " ".join(str(d) for d in spec["drafted_per_head"]))
        print("           heads 1..j all right at every generated position (not only where a draft starts): "
              + " ".join(f"{a:.2f}" for a in agreement))
    out = {"machine": info, "model": args.model, "precision": precision,
           "mtp_heads": cfg.model.mtp_heads, "mtp_head": cfg.model.mtp_head,
           "params": {k: v for k, v in vars(args).items() if k != "out"}, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
