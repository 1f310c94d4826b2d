"""The `varlen` command: train | sample | convert | data stats | plot.

Any config field can be set as `--section.field VALUE` after the subcommand's own options.
Errors in the user's input print one line naming the input and the fix, and exit with code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint.io import CheckpointError
from .config import ConfigError
from .data.corpus import CorpusError

USER_ERRORS = (ConfigError, CorpusError, CheckpointError, FileNotFoundError)


def _split_overrides(extra: list[str]) -> dict[str, str]:
    """['--model.dim', '128', '--train.lr=1e-3'] -> {'model.dim': '128', 'train.lr': '1e-3'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unrecognised argument {arg!r}; config fields look like --model.dim 128")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(extra):
                raise ConfigError(f"option {arg} needs a value, e.g. {arg} 128")
            key, value = arg[2:], extra[i + 1]
            i += 2
        out[key] = value
    return out


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from .checkpoint import io
    from .config import apply_dict, load_config, load_yaml, set_option, validate
    from .train.loop import train

    if args.corpus:
        overrides = {"data.corpus": args.corpus, **overrides}
    if args.init_from:
        if args.resume:
            raise ConfigError("--init-from starts a new run and --resume continues one; pass only one of them")
        overrides = {"train.init_from": args.init_from, **overrides}
    if args.resume:
        ckpt = io.resolve(args.resume)
        cfg = io.load_config(ckpt)
        if args.config:
            apply_dict(cfg, load_yaml(args.config), args.config)
        for k, v in overrides.items():
            set_option(cfg, k, v)
        validate(cfg)
        run_dir = Path(args.resume)
    else:
        cfg = load_config(args.preset, args.config, overrides)
        run_dir = Path(args.out)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731  stdout stays clean for scripts
    last = train(cfg, run_dir, resume=bool(args.resume), log=log, progress=not args.no_progress)
    if last:
        val = f", val_loss {last['val_loss']:.4f}" if "val_loss" in last else ""
        log(f"done: step {last['step']}, loss {last['loss']:.4f}{val}; checkpoints in {run_dir}/checkpoints")
    return 0


def cmd_sample(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import torch

    from .checkpoint import load_model
    from .generate import generate

    if overrides:
        raise ConfigError(f"varlen sample takes no config fields (got --{next(iter(overrides))})")
    if args.temperature < 0:
        raise ConfigError(f"--temperature is {args.temperature}; use 0 (greedy) or a positive value")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p is {args.top_p}; use a value in (0, 1]")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, tok = load_model(args.run_dir, device)
    prompt_ids = [tok.bos_id] + tok.encode(args.prompt)  # as every training document starts
    new = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                   args.seed, stop_id=tok.eod_id, max_seq_len=cfg.model.max_seq_len)
    sys.stdout.write(tok.decode(new) + "\n")
    return 0


def cmd_data_stats(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import numpy as np

    from .data.corpus import Corpus
    from .data.tokens import prepare
    from .plots import plot_length_histogram
    from .train.loop import unigram_entropy

    corpus = Corpus(args.corpus, args.glob, args.field, args.skip_bad)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    tok, store = prepare(corpus, args.vocab_size, args.cache_dir or None, log=log)
    lengths = store.lengths - 2  # without the two EOD frame tokens
    pct = {q: int(np.percentile(lengths, q)) for q in (10, 50, 90, 99)}
    print(f"corpus           {args.corpus}")
    print(f"documents        {store.num_docs:,}")
    print(f"tokens           {int(lengths.sum()):,} (BPE vocab {tok.vocab_size:,})")
    print(f"length mean      {lengths.mean():,.0f}")
    print("length pct       " + "  ".join(f"p{q} {v:,}" for q, v in pct.items()) + f"  max {int(lengths.max()):,}")
    print(f"unigram entropy  {unigram_entropy(store, np.arange(store.num_docs)):.3f} nats/token")
    out = plot_length_histogram(lengths, args.plot, f"{args.corpus}: {store.num_docs:,} documents")
    print(f"histogram        {out}")
    return 0


def cmd_convert(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from .checkpoint import hf_llama, load_model

    if overrides:
        raise ConfigError(f"varlen convert takes no config fields (got --{next(iter(overrides))})")
    src = args.to_hf or args.from_hf
    if args.from_hf and not hf_llama.is_hf_dir(src):
        raise ConfigError(f"--from-hf {src}: no Hugging Face config.json (with model_type) there; pass a HF "
                          f"model directory")
    model, cfg, tok = load_model(src)
    out = (hf_llama.save_hf if args.to_hf else hf_llama.save_varlen)(model, cfg, tok, args.out_dir)
    kind = "Hugging Face Llama" if args.to_hf else "varlen"
    print(f"wrote {kind} checkpoint {out} ({model.num_params() / 1e6:.2f}M parameters)", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from .plots import plot_loss
    print(plot_loss(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="varlen", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model on packed variable-length documents",
                       description="Train; any config field can follow as --section.field VALUE.")
    t.add_argument("--config", help="YAML config file (applied over the preset)")
    t.add_argument("--preset", default="tiny", help="preset in configs/ (default: tiny)")
    t.add_argument("--corpus", help="stdlib | DIR | FILE.jsonl | FILE.parquet (default: stdlib)")
    t.add_argument("--out", default="runs/tiny", help="run directory (default: runs/tiny)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest checkpoint")
    t.add_argument("--init-from", metavar="DIR", help="start from these weights and tokenizer: a varlen run or "
                   "checkpoint, or a Hugging Face Llama directory (fine-tuning)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="generate text from a trained model")
    s.add_argument("run_dir", help="run directory or checkpoint directory")
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_sample)

    d = sub.add_parser("data", help="inspect a corpus")
    dsub = d.add_subparsers(dest="data_command", required=True)
    ds = dsub.add_parser("stats", help="documents, tokens, length percentiles and a histogram PNG")
    ds.add_argument("corpus", nargs="?", default="stdlib")
    ds.add_argument("--glob", default="**/*.txt")
    ds.add_argument("--field", default="text")
    ds.add_argument("--skip-bad", action="store_true")
    ds.add_argument("--vocab-size", type=int, default=4096)
    ds.add_argument("--cache-dir", default="")
    ds.add_argument("--plot", default="lengths.png", help="histogram file (default: lengths.png)")
    ds.set_defaults(fn=cmd_data_stats)

    c = sub.add_parser("convert", help="convert checkpoints to or from Hugging Face Llama directories")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", metavar="RUN_DIR_OR_CKPT", help="varlen run or checkpoint -> HF directory")
    way.add_argument("--from-hf", metavar="HF_DIR", help="HF Llama directory -> varlen checkpoint directory")
    c.add_argument("out_dir", help="new output directory")
    c.set_defaults(fn=cmd_convert)

    pl = sub.add_parser("plot", help="draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl")
    pl.add_argument("run_dir")
    pl.set_defaults(fn=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return args.fn(args, _split_overrides(extra))
    except USER_ERRORS as e:
        print(f"varlen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("varlen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
