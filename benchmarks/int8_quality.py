"""What serving precision costs in quality and buys in speed: fp32, bf16 and weight-only int8 on one trained run.

For each setting the model goes through the serving engine's own preparation (fused projections, then
precision.prepare_model) and is measured on:
  - perplexity on the run's held-out documents (the training split's validation documents, each cut into
    pieces of the model's max_seq_len, every target token counted once);
  - greedy agreement with fp32: the same --prompts prompts (starts of held-out documents), --max-tokens
    tokens each through the engine, and the share of each output's leading tokens equal to fp32's;
  - decode speed: tokens per second of those greedy requests at batch 1 and at --batch.

    .venv/bin/python benchmarks/int8_quality.py --model runs/tiny
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from machine import machine_info
from varlen.batch import Batch
from varlen.checkpoint import load_model
from varlen.config import ServeConfig
from varlen.data.corpus import Corpus
from varlen.data.tokens import prepare, split_documents
from varlen.model.quant import Int8Linear
from varlen.serve.engine import Engine
from varlen.serve.request import SamplingParams

SETTINGS = {"fp32": ("float32", "none"), "bf16": ("bfloat16", "none"), "int8": ("bfloat16", "int8")}


def held_out(cfg, tok, max_docs: int) -> list[list[int]]:
    corpus = Corpus(cfg.data.corpus, cfg.data.glob, cfg.data.field, cfg.data.skip_bad, cfg.data.max_docs)
    _, store = prepare(corpus, cfg.model.vocab_size, tokenizer=tok, log=lambda _: None)
    _, val_ids = split_documents(store.num_docs, cfg.data.val_fraction)
    return [store.doc(int(i)).astype("int64").tolist() for i in val_ids[:max_docs]]


@torch.inference_mode()
def perplexity(model, docs: list[list[int]], piece: int) -> tuple[float, int]:
    total, count = 0.0, 0
    for doc in docs:
        for s in range(0, len(doc) - 1, piece):
            ids = torch.tensor(doc[s:s + piece + 1])
            if len(ids) < 2:
                continue
            logits = model(ids[:-1], Batch.from_seqlens([len(ids) - 1])).float()
            total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(total / count), count


def decode(engine: Engine, prompts: list[list[int]], max_tokens: int, batch: int) -> tuple[list[list[int]], float]:
    engine.cfg.max_num_seqs = engine.scheduler.max_num_seqs = batch
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    t = time.perf_counter()
    out = engine.generate(prompts, params)
    seconds = time.perf_counter() - t
    return [c.token_ids for [c] in out], len(prompts) * max_tokens / seconds


def agreement(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained varlen run or checkpoint")
    ap.add_argument("--docs", type=int, default=36, help="held-out documents for perplexity")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "int8_quality.json"))
    args = ap.parse_args()

    base, cfg, tok = load_model(args.model)
    docs = held_out(cfg, tok, args.docs)
    prompts = [d[:args.prompt_tokens] for d in docs if len(d) > args.prompt_tokens][:args.prompts]
    info = machine_info(torch.get_num_threads(), packages=())
    print(f"# {info['date']} {info['cpu']} {info['cpu_flags']}, torch {info['torch']}, {info['threads']} threads; "
          f"{len(docs)} held-out documents, {len(prompts)} prompts")
    rows, reference = [], None
    for name in args.settings.split(","):
        dtype, quant = SETTINGS[name]
        model = copy.deepcopy(base)
        engine = Engine(model, tok, ServeConfig(dtype=dtype, quantization=quant, kv_cache_gib=0.25,
                                                max_model_len=args.prompt_tokens + args.max_tokens + 8))
        # Int8Linear runs many-row calls (these pieces) on its dense weight: for perplexity, force the int8
        # weights on every call, so the figure is the quality decoding with them has.
        int8 = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
        crossover = [m.max_int8_rows for m in int8]
        for m in int8:
            m.max_int8_rows = 1 << 30
        ppl, tokens = perplexity(engine.model, docs, cfg.model.max_seq_len)
        for m, cross in zip(int8, crossover):
            m.max_int8_rows = cross
        outs1, tps1 = decode(engine, prompts, args.max_tokens, 1)
        outsb, tpsb = decode(engine, prompts, args.max_tokens, args.batch)
        reference = reference or outs1
        agree = [agreement(o, r) / args.max_tokens for o, r in zip(outs1, reference)]
        row = {"setting": name, "dtype": dtype, "quantization": quant, "perplexity": ppl, "ppl_tokens": tokens,
               "greedy_agreement_with_fp32": sum(agree) / len(agree), "exact_outputs": sum(a == 1 for a in agree),
               "decode_tok_s_batch1": tps1, f"decode_tok_s_batch{args.batch}": tpsb,
               "same_tokens_batch1_vs_batch": sum(a == b for a, b in zip(outs1, outsb)),
               "precision": engine.precision.reason}
        rows.append(row)
        print(json.dumps(row))
    Path(args.out).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"{'setting':<6} {'ppl':>8} {'agree':>6} {'b1 tok/s':>9} {f'b{args.batch} tok/s':>9}")
    for r in rows:
        print(f"{r['setting']:<6} {r['perplexity']:8.3f} {r['greedy_agreement_with_fp32']:6.3f} "
              f"{r['decode_tok_s_batch1']:9.1f} {r[f'decode_tok_s_batch{args.batch}']:9.1f}")


if __name__ == "__main__":
    main()
