"""One packed row, two regimes: varlen vs Hugging Face LlamaForCausalLM (padding-free position_ids) on
forward + backward of a single row, holding one document or several.

In a one-document row both run plain causal SDPA; in a several-document row HF attends through a dense
block-diagonal (T, T) mask while varlen runs causal SDPA per document. This explains where the
whole-corpus speed-up of benchmarks/train_throughput.py comes from (and where it cannot).

    .venv/bin/python benchmarks/row_mix.py --rows 8192 4000,3000,1192
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from machine import machine_info, matrix_units
from varlen.batch import Batch
from varlen.config import ModelConfig
from varlen.model.transformer import Transformer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=["8192", "4000,3000,1192"],
                    help="rows to time, each a comma-separated list of document lengths")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, dim=256, n_layer=4, n_head=4, n_kv_head=2, max_seq_len=1 << 16,
                      attention="sdpa_docs")
    ours = Transformer(cfg)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=cfg.ffn_dim,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      tie_word_embeddings=True, attn_implementation="sdpa", use_cache=False))
    info = machine_info(args.threads)
    print(f"date {info['date']} | CPU {info['cpu']} | matrix units: {matrix_units(info)} | torch {info['torch']}")
    print(f"model: dim 256, 4 layers, 4/2 heads, fp32, forward + backward, {args.threads} threads, "
          f"mean of {args.repeats} after one warm-up")
    print(f"{'documents in the row':28} {'tokens':>7} {'varlen tok/s':>12} {'HF tok/s':>9} {'varlen x':>8}")
    for spec in args.rows:
        lens = [int(x) for x in spec.split(",")]
        T = sum(lens)
        ids, targets = torch.randint(0, 4096, (T,)), torch.randint(0, 4096, (T,))
        batch = Batch.from_seqlens(lens)

        def run_ours() -> None:
            F.cross_entropy(ours(ids, batch), targets, reduction="sum").backward()

        def run_hf() -> None:
            extra = {"position_ids": batch.positions[None]} if len(lens) > 1 else {}
            logits = hf(input_ids=ids[None], use_cache=False, **extra).logits[0]
            F.cross_entropy(logits, targets, reduction="sum").backward()

        a, b = timed(run_ours, args.repeats), timed(run_hf, args.repeats)
        print(f"{spec:28} {T:>7} {T / a:>12,.0f} {T / b:>9,.0f} {b / a:>7.2f}x")


if __name__ == "__main__":
    main()
