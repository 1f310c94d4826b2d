"""The `varlen` command: train | sample | serve | generate | convert | data stats | bench calibrate | plot.

Any config field can be set as `--section.field VALUE` after the subcommand's own options.
Errors in the user's input print one line naming the input and the fix, and exit with code 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .checkpoint.io import CheckpointError
from .config import DTYPE_CHOICES, QUANTIZATION_CHOICES, ConfigError
from .data.corpus import CorpusError
from .serve.request import RequestError

USER_ERRORS = (ConfigError, CorpusError, CheckpointError, RequestError, FileNotFoundError)


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


def _without(argv: list[str], flags: dict[str, bool]) -> list[str]:
    """argv minus the given options ({flag: takes a value}), in either `--flag v` or `--flag=v` form."""
    out, i = [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in flags:
            i += 1 if "=" in argv[i] or not flags[name] else 2
            continue
        out.append(argv[i])
        i += 1
    return out


def launch_torchrun(args: argparse.Namespace) -> int:
    """`varlen train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m varlen train ...`."""
    import subprocess

    cores = os.cpu_count() or 1
    if args.nproc > cores and not args.force:
        raise ConfigError(f"--nproc {args.nproc} is more than this machine's {cores} cores; ranks would fight "
                          f"over them. Use --nproc {cores} or add --force")
    rest = _without(args.argv, {"--nproc": True, "--force": False})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
           "-m", "varlen", *rest]
    print("running: " + " ".join(cmd), file=sys.stderr)
    return subprocess.call(cmd)


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from .checkpoint import io
    from .config import apply_dict, load_config, load_yaml, set_option, validate
    from .train.loop import train

    if args.nproc < 1:
        raise ConfigError(f"--nproc is {args.nproc}; use 1 or more processes")
    if args.nproc > 1:
        return launch_torchrun(args)
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
    if os.environ.get("RANK", "0") != "0":
        log = lambda msg: None  # noqa: E731  under torchrun, rank 0 speaks for the job
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
    prompt_ids = tok.encode_prompt(args.prompt) or [tok.bos_id]  # no text and no BOS: start a document
    if args.speculative:
        new = _sample_speculative(model, tok, prompt_ids, args)
    else:
        from .precision import prepare_model
        prepare_model(model, args.dtype)  # the engine does this itself on the --speculative path
        new = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                       args.seed, stop_id=tok.eod_id, max_seq_len=cfg.model.max_seq_len)
    sys.stdout.write(tok.decode(new) + "\n")
    return 0


def _sample_speculative(model, tok, prompt_ids: list[int], args: argparse.Namespace) -> list[int]:
    """`varlen sample --speculative`: one request through the serving engine, which drafts with the MTP
    heads; its tokens are what plain sampling would give (the same when greedy, the same distribution
    otherwise). Unlike plain sampling it stops at the model's context instead of sliding a window."""
    from .config import ServeConfig
    from .serve.engine import Engine
    from .serve.request import SamplingParams

    if args.max_new_tokens < 1:
        return []
    engine = Engine(model, tok, ServeConfig(max_num_seqs=1, speculative=True, num_speculative=args.num_speculative,
                                            adaptive_drafts=not args.fixed_drafts, dtype=args.dtype))
    room = engine.max_model_len - len(prompt_ids)
    if room < 1:
        raise ConfigError(f"the prompt ({len(prompt_ids)} tokens) fills the model's {engine.max_model_len}-token "
                          f"context; shorten --prompt or drop --speculative")
    if args.max_new_tokens > room:
        print(f"--speculative: stopping at the context, after {room} tokens", file=sys.stderr)
    params = SamplingParams(max_tokens=min(args.max_new_tokens, room), temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    [[done]] = engine.generate([prompt_ids], params)
    s = engine.spec_stats
    print(f"speculative: {s.tokens_per_step:.2f} tokens per verify step; drafts accepted per head: "
          + " ".join(f"{a:.2f}" for a in s.acceptance), file=sys.stderr)
    return done.token_ids


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


def _serve_config(args: argparse.Namespace):
    from .config import ServeConfig
    cfg = ServeConfig(block_size=args.block_size, kv_cache_gib=args.kv_cache_gib, max_num_seqs=args.max_num_seqs,
                      max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                      max_waiting=args.max_waiting, speculative=args.speculative,
                      num_speculative=args.num_speculative, speculative_max_batch=args.speculative_max_batch,
                      adaptive_drafts=not args.fixed_drafts, dtype=args.dtype, quantization=args.quantization,
                      compile=args.compile, autotune=not args.no_autotune)
    checks = [(cfg.block_size >= 1, "--block-size must be at least 1"),
              (cfg.num_speculative >= 0, "--num-speculative must be 0 (one draft per MTP head) or positive"),
              (cfg.speculative or not cfg.num_speculative, "--num-speculative needs --speculative"),
              (cfg.speculative_max_batch >= 0, "--speculative-max-batch must be 0 (always draft) or positive"),
              (cfg.speculative or not cfg.speculative_max_batch, "--speculative-max-batch needs --speculative"),
              (cfg.speculative or cfg.adaptive_drafts, "--fixed-drafts needs --speculative"),
              (cfg.kv_cache_gib > 0, "--kv-cache-gib must be positive"),
              (cfg.max_num_seqs >= 1, "--max-num-seqs must be at least 1"),
              (cfg.max_num_batched_tokens >= 1, "--max-num-batched-tokens must be at least 1"),
              (cfg.max_model_len >= 0, "--max-model-len must be 0 (the model's) or positive"),
              (cfg.max_waiting >= 1, "--max-waiting must be at least 1")]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def cmd_serve(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from .checkpoint import hf_llama, io
    from .serve.server import serve

    if overrides:
        raise ConfigError(f"varlen serve takes no config fields (got --{next(iter(overrides))})")
    hf = hf_llama.is_hf_dir(args.run_dir)
    if not hf:
        io.resolve(args.run_dir)  # a missing or empty directory fails here, before the port opens
    cfg = _serve_config(args)
    if cfg.speculative:  # so does --speculative on a model without MTP heads
        import json

        from .serve.speculate import num_drafts_per_step
        path = Path(args.run_dir)
        model_cfg = (hf_llama.config_from_hf(json.loads((path / "config.json").read_text()), path) if hf
                     else io.load_config(io.resolve(path)).model)
        num_drafts_per_step(cfg, model_cfg.mtp_heads)
    keys = list(args.api_key or [])
    if args.api_key_file:
        path = Path(args.api_key_file)
        if not path.is_file():
            raise ConfigError(f"--api-key-file {path} not found; pass a file with one key per line")
        keys += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return serve(args.run_dir, args.host, args.port, keys, cfg, args.name, args.log_level)


def _jsonl_prompts(path: Path):
    """Yield (line number, prompt) for each non-empty line of a JSONL prompts file, reading one line at a time;
    a bad line raises ConfigError naming path:line."""
    import json

    with path.open(encoding="utf-8-sig", errors="replace") as f:  # -sig: a leading BOM is not JSON
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{n} is not valid JSON ({e.msg}); write one {{\"prompt\": ...}} object "
                                  f"per line") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise ConfigError(f"{path}:{n} is not a JSON object with a \"prompt\" field; write one "
                                  f"{{\"prompt\": ...}} object per line")
            prompt = row["prompt"]
            if not (isinstance(prompt, str) or isinstance(prompt, list) and all(type(t) is int for t in prompt)):
                raise ConfigError(f"{path}:{n}: \"prompt\" must be a string or a list of integer token ids, not "
                                  f"{repr(prompt)[:60]}")
            yield n, prompt


def cmd_generate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import json

    from .serve.engine import LLM, PromptError
    from .serve.request import SamplingParams

    if overrides:
        raise ConfigError(f"varlen generate takes no config fields (got --{next(iter(overrides))})")
    path = Path(args.prompts_file)
    if not path.is_file():
        raise ConfigError(f"--prompts-file {path} not found; pass a JSONL file with one {{\"prompt\": ...}} per line")
    # A first pass keeps no prompt but finds a bad line before the model loads (not hours into the run) and
    # gives the progress bar its total; parsing is cheap next to generating.
    total = sum(1 for _ in _jsonl_prompts(path))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    llm = LLM(args.run_dir, _serve_config(args))
    held: dict[int, tuple[int, str | list[int]]] = {}  # index -> (line, prompt), only for prompts in flight

    def feed():
        for i, (line, prompt) in enumerate(_jsonl_prompts(path)):
            held[i] = line, prompt
            yield prompt

    try:
        for i, [c] in llm.generate_iter(feed(), params, progress=not args.no_progress, total=total):
            _, prompt = held.pop(i)
            row = {"prompt": prompt, "text": c.text, "finish_reason": c.finish_reason,
                   "completion_tokens": len(c.token_ids)}
            if c.error:
                row["error"] = c.error
            sys.stdout.write(json.dumps(row) + "\n")
            sys.stdout.flush()  # each row is usable (tail -f, a crash) as soon as it is written
    except PromptError as e:
        raise RequestError(f"{path}:{held[e.index][0]}: {e.reason}") from None
    except BrokenPipeError:  # the reader left (`| head`): stop generating, quietly, as other Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush fails no more
        return 141  # 128 + SIGPIPE
    return 0


def cmd_bench_calibrate(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    import torch

    from .config import load_config
    from .train.calibrate import calibrate, calibrate_comm, save

    cfg = load_config(args.preset, args.config, overrides)
    if args.lengths is None:  # the default lengths the model can take, and its longest
        longest = cfg.model.max_seq_len
        args.lengths = ",".join(str(L) for L in sorted({L for L in (128, 512, 1024, 2048) if L < longest} | {longest}))
    try:
        lengths = sorted({int(x) for x in args.lengths.split(",")})
    except ValueError:
        raise ConfigError(f"--lengths {args.lengths!r} must be comma-separated integers, e.g. 256,1024,4096") from None
    if not lengths or lengths[0] < 1:
        raise ConfigError(f"--lengths {args.lengths!r} needs positive lengths, e.g. 256,1024,4096")
    try:
        mib = sorted({float(x) for x in args.comm_mib.split(",")})
    except ValueError:
        raise ConfigError(f"--comm-mib {args.comm_mib!r} must be comma-separated sizes in MiB, e.g. 1,4,16") from None
    if not mib or mib[0] <= 0:
        raise ConfigError(f"--comm-mib {args.comm_mib!r} needs positive sizes, e.g. 1,4,16")
    if args.comm_ranks == 1 or args.comm_ranks < 0:
        raise ConfigError(f"--comm-ranks {args.comm_ranks} must be 2 or more processes (0 skips the all-to-all)")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    log(f"timing forward+backward, {args.tokens:,} tokens per row, {torch.get_num_threads()} threads "
        f"(dim {cfg.model.dim}, {cfg.model.n_layer} layers):")
    cost, rows = calibrate(cfg.model, lengths, args.tokens, args.repeats, log=log)
    c, comm = 0.0, None
    if args.comm_ranks:
        log(f"timing all-to-all between {args.comm_ranks} gloo processes (sequence parallelism's exchange):")
        c, comm = calibrate_comm(cfg.model, args.comm_ranks, mib, log=log)
    out = save(args.out, cost, cfg.model, rows, c, comm)
    worst = max(abs(cost(r["length"]) / r["seconds_per_seq"] - 1) for r in rows)
    if cost.b == 0:
        log("warning: the timings show no quadratic (attention) term, so the fit set b = 0; the machine may "
            "have been busy, or the lengths too short: rerun, or add a longer --lengths value")
    comm_text = (f"all-to-all c = {c:.4g} s per token leaving a rank ({c / max(cost.a, 1e-30):.3g}x a token's "
                 f"linear compute)" if comm else "all-to-all not timed (c = 0)")
    print(f"cost(L) = {cost.a:.4g} L + {cost.b:.4g} L^2 seconds (b/a = {cost.b / max(cost.a, 1e-30):.3g}); "
          f"worst fit error {100 * worst:.1f}%; {comm_text}; saved {out} (use with --data.cost_model {out})")
    return 0


def cmd_plot(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from .plots import plot_loss
    print(plot_loss(args.run_dir))
    return 0


def speculative_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--speculative", action="store_true", help="draft tokens with the model's MTP heads and "
                    "verify them in the next forward (same output, fewer forwards)")
    sp.add_argument("--num-speculative", type=int, default=0, metavar="K",
                    help="drafts per step with --speculative (default 0: one per MTP head)")
    sp.add_argument("--fixed-drafts", action="store_true",
                    help="verify all K drafts every step (default: per step only as many as the heads' confidence "
                         "and the verify-step costs measured at start-up say pay)")


def dtype_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                    help="weights' dtype (default auto: bfloat16 on CUDA and on CPUs where a probe finds bf16 "
                         "matmuls faster, else float32)")


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
    t.add_argument("--nproc", type=int, default=1, help="data-parallel processes on this machine, started with "
                   "torchrun (default 1); or run `torchrun --nproc_per_node N -m varlen train ...` yourself")
    t.add_argument("--force", action="store_true", help="allow --nproc above the number of cores")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="generate text from a trained model")
    s.add_argument("run_dir", help="run directory or checkpoint directory")
    s.add_argument("--prompt", default="")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    dtype_option(s)
    speculative_options(s)
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

    def engine_options(sp: argparse.ArgumentParser) -> None:
        speculative_options(sp)
        sp.add_argument("--speculative-max-batch", type=int, default=0, metavar="N",
                        help="with --speculative, draft only while at most N requests run (default 0: always); "
                             "a big batch keeps the hardware busy, and verifying drafts can cost more than it saves")
        sp.add_argument("--kv-cache-gib", type=float, default=0.5, help="memory for the paged KV cache (GiB)")
        sp.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
        sp.add_argument("--max-num-seqs", type=int, default=32, help="sequences decoded together")
        sp.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per forward")
        sp.add_argument("--max-model-len", type=int, default=0, help="prompt + output limit (0 = the model's)")
        sp.add_argument("--max-waiting", type=int, default=256, help="queued requests before 429")
        dtype_option(sp)
        sp.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="none",
                        help="int8: weight-only int8 weights, a quarter of fp32's memory (default none)")
        sp.add_argument("--compile", action="store_true",
                        help="compile the forward with torch.compile (fused small ops, inductor's prepacked "
                             "weights, decode attention in the graph): faster steps after 3-6 minutes of "
                             "compiling at start-up")
        sp.add_argument("--no-autotune", action="store_true",
                        help="with --compile: skip timing inductor's GEMM kernels for decode steps (a shorter "
                             "start; int8 decoding runs slower)")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    sv.add_argument("run_dir", help="varlen run or checkpoint directory, or a Hugging Face Llama directory")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", action="append", help="required bearer key for /v1/* (repeatable)")
    sv.add_argument("--api-key-file", help="file with one accepted key per line")
    sv.add_argument("--name", help="model name in the API (default: the directory's name)")
    sv.add_argument("--log-level", default="warning")
    engine_options(sv)
    sv.set_defaults(fn=cmd_serve)

    g = sub.add_parser("generate", help="offline batch generation from a JSONL file of prompts")
    g.add_argument("run_dir")
    g.add_argument("--prompts-file", required=True, help='JSONL, one {"prompt": "..."} per line')
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-progress", action="store_true")
    engine_options(g)
    g.set_defaults(fn=cmd_generate)

    c = sub.add_parser("convert", help="convert checkpoints to or from Hugging Face Llama directories")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--to-hf", metavar="RUN_DIR_OR_CKPT", help="varlen run or checkpoint -> HF directory")
    way.add_argument("--from-hf", metavar="HF_DIR", help="HF Llama directory -> varlen checkpoint directory")
    c.add_argument("out_dir", help="new output directory")
    c.set_defaults(fn=cmd_convert)

    b = sub.add_parser("bench", help="measure this machine")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bc = bsub.add_parser("calibrate", help="fit the cost model a*L + b*L^2 (timed forward+backward passes) "
                         "and c (a timed all-to-all) of balancing and sequence-parallel planning; model fields "
                         "as --model.dim 256 etc.")
    bc.add_argument("--config", help="YAML config file (applied over the preset)")
    bc.add_argument("--preset", default="tiny", help="preset in configs/ (default: tiny)")
    bc.add_argument("--lengths", help="sequence lengths to time (default 128,512,1024,2048, those up to "
                    "model.max_seq_len, and max_seq_len)")
    bc.add_argument("--tokens", type=int, default=8192, help="tokens per timed row (default 8192)")
    bc.add_argument("--repeats", type=int, default=3)
    bc.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    bc.add_argument("--comm-ranks", type=int, default=2,
                    help="gloo processes that time the all-to-all of sequence parallelism (0 = skip; default 2)")
    bc.add_argument("--comm-mib", default="1,4,16", help="all-to-all send sizes per rank, MiB (default 1,4,16)")
    bc.add_argument("--out", default="cost_model.json", help="where to save a, b and c (default cost_model.json)")
    bc.set_defaults(fn=cmd_bench_calibrate)

    pl = sub.add_parser("plot", help="draw RUN_DIR/loss.png from RUN_DIR/metrics.jsonl")
    pl.add_argument("run_dir")
    pl.set_defaults(fn=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return args.fn(args, _split_overrides(extra))
    except USER_ERRORS as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike; one says so
            print(f"varlen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("varlen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
