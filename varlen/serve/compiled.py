"""The serving forward compiled with PyTorch's inductor: a whole step as one graph.

A decode step is ~120 matmuls and ~1,700 small ops (norms, RoPE, residual adds, SwiGLU, casts); run eagerly
those small ops cost a third of a batch-1 step on a 2-core CPU. Inductor fuses them into a few loops and, with
the weights frozen, prepacks every bf16 matmul for oneDNN itself (what packed.py does by hand for the eager
path).

Two families of graphs:
- decode (DecodeForward): every sequence of the step runs the same few new tokens (one when decoding; the
  last token and its drafts when verifying speculative drafts) and their contexts, padded to the longest, are
  mostly real (paged.decode_inputs). Attention runs inside the graph, so no Python runs per layer; the new
  keys and values come out of the graph and the runner writes them to the cache. Inductor autotunes the
  one-token graph's GEMMs (its own C++ templates against the library kernels): 1.5-2x faster batch-1 matmuls
  here. The count of new tokens per sequence is static (one graph per count: 1 to 1 + drafts).
- general (StepForward): any other step (prefill chunks, mixed steps, uneven draft counts). The paged
  attention stays the eager code of model/attention/paged.py, called from the graph as one custom op whose
  plan changes every step; the step's PagedBatch reaches it as an opaque reference
  (torch._library.opaque_object), so a new batch needs no recompile.
Where opaque objects are missing (torch < 2.10) or the compiler fails, serving stays eager (`available`, and
the engine's fallback).

Shapes: token and row counts are dynamic; inductor specialises a count of 1, and int8 weights branch on the row
count (Int8Linear), so each family has a few graphs, all compiled at engine start (engine.warmup_prompts).
"""
from __future__ import annotations

import logging
import types

import torch
import torch.nn as nn

from ..batch import PagedBatch
from ..config import ServeConfig
from ..model.attention import paged
from ..model.transformer import Transformer

log = logging.getLogger(__name__)

try:
    from torch._library.opaque_object import register_opaque_type
    from torch._opaque_base import OpaqueBase
except ImportError:  # torch without opaque objects: no compiled serving
    OpaqueBase = object
    register_opaque_type = None


class StepRef(OpaqueBase):
    """One step's PagedBatch, handed through the compiled graph to the attention op unopened."""

    def __init__(self, batch: PagedBatch):
        self.batch = batch


def available() -> bool:
    return register_opaque_type is not None and hasattr(torch.library, "custom_op")


if available():
    register_opaque_type(StepRef, typ="reference")

    @torch.library.custom_op("varlen::paged_attention", mutates_args=())
    def paged_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: StepRef,
                           layer: int) -> torch.Tensor:
        # Writes k and v into the step's cache (state the graph never sees) and attends. Contiguous, as the
        # fake below promises: the compiled code relies on the strides it was told.
        return paged.attention(q, k, v, step.batch.layer_view(layer)).contiguous()

    @paged_attention_op.register_fake
    def _(q, k, v, step, layer):
        return torch.empty_like(q, memory_format=torch.contiguous_format)


class GraphBatch:
    """What the model reads of a step inside the graph: positions, and per layer a handle the attention op
    takes (Transformer.trunk uses `attend` and `layer_view` when a batch brings them)."""

    def __init__(self, positions: torch.Tensor, step: StepRef):
        self.positions, self.step = positions, step

    def layer_view(self, layer: int) -> tuple[StepRef, int]:
        return self.step, layer

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: tuple[StepRef, int]) -> torch.Tensor:
        return torch.ops.varlen.paged_attention(q, k, v, *ref)


class DecodeGraphBatch:
    """A step where every sequence runs Q new tokens after its cached context (Q = 1: decoding; 1 + d: verifying
    d drafts), attended inside the graph (no Python per layer).

    Written as elementwise products and sums over cache rows indexed by slot, not as gather + SDPA: inductor
    fuses the indexing into its loops, so each layer reads every cached key and value once, in place, into
    fp32 accumulators, where gather + SDPA copies them out and CPU SDPA then runs a tiny GEMM per sequence and
    head (2-3x slower per layer on a 16-sequence step here). Padding (contexts shorter than the longest) costs
    compute on reads of one cached row, not memory traffic; paged.decode_inputs bounds it. The graph never
    writes the cache; it returns every layer's new keys and values for the runner to write after the step (an
    in-graph write would be a mutation of a graph input)."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, causal: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor):
        self.positions, self.slots, self.mask, self.k_cache, self.v_cache = positions, slots, mask, k_cache, v_cache
        self.causal = causal  # (Q, Q): new token i sees new tokens j <= i; its static shape fixes Q per graph
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def layer_view(self, layer: int) -> int:
        return layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        self.new_k.append(k)
        self.new_v.append(v)
        if self.causal.shape[0] > 1:
            return self._attend_queries(q, k, v, layer)
        B = self.slots.shape[0]
        hkv, d = k.shape[1], k.shape[2]
        # The H / Hkv query heads sharing a kv head (r of them) are read against that head's keys once.
        qg = q.view(B, 1, hkv, -1, d).float() * d ** -0.5                            # (B, 1, Hkv, r, D)
        # Stored once: inductor inlines pointwise producers into their consumers, and would recompute the query
        # (its RoPE: pow, cos) for every cached key (2x slower steps here). as_strided needs a stored input.
        qg = torch.as_strided(qg, qg.shape, qg.stride())
        keys = self.k_cache[layer][self.slots].float().unsqueeze(3)                   # (B, L, Hkv, 1, D)
        old = (qg * keys).sum(-1).masked_fill(~self.mask[:, :, None, None], float("-inf"))  # (B, L, Hkv, r)
        scores = torch.cat([old, (qg * k.view(B, 1, hkv, 1, d).float()).sum(-1)], 1)  # + the new token's key
        p = torch.softmax(scores, 1).unsqueeze(-1)
        values = self.v_cache[layer][self.slots].float().unsqueeze(3)
        o = (p[:, :-1] * values).sum(1) + p[:, -1] * v.view(B, hkv, 1, d).float()    # (B, Hkv, r, D)
        return o.reshape(B, -1, d).to(q.dtype)

    def _attend_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        """attend for Q > 1 new tokens per sequence: the same sums with a query axis, the new tokens' keys
        masked causally. (Kept apart from Q = 1, whose loops inductor was tuned on.)"""
        B, Q = self.slots.shape[0], self.causal.shape[0]
        hkv, d = k.shape[1], k.shape[2]
        qg = q.view(B, Q, 1, hkv, -1, d).float() * d ** -0.5                         # (B, Q, 1, Hkv, r, D)
        qg = torch.as_strided(qg, qg.shape, qg.stride())
        keys = self.k_cache[layer][self.slots].float()[:, None, :, :, None]           # (B, 1, L, Hkv, 1, D)
        old = (qg * keys).sum(-1).masked_fill(~self.mask[:, None, :, None, None], float("-inf"))  # (B, Q, L, Hkv, r)
        new = (qg * k.view(B, 1, Q, hkv, 1, d).float()).sum(-1)                       # (B, Q, Q, Hkv, r)
        new = new.masked_fill(~self.causal[None, :, :, None, None], float("-inf"))
        p = torch.softmax(torch.cat([old, new], 2), 2).unsqueeze(-1)
        values = self.v_cache[layer][self.slots].float()[:, None, :, :, None]
        # Sliced from the end by the static Q: a slice by L (a symbolic size) would specialise the graph on it.
        o = (p[:, :, :-Q] * values).sum(2) + (p[:, :, -Q:] * v.view(B, 1, Q, hkv, 1, d).float()).sum(2)
        return o.reshape(B * Q, -1, d).to(q.dtype)                                   # (B * Q, H, D)


class DecodeForward(nn.Module):
    """Transformer.forward (or logits_and_draft_states, when drafting with `heads` heads) over a step of Q new
    tokens per sequence -> (logits, draft states or None, new keys, new values), keys and values
    (layers, B * Q, Hkv, D). Logits (and states) at every new token: a verify step needs them all, and a
    prompt of Q tokens, which needs only its last, then runs the verify step's graph (Q extra vocab rows for a
    prompt of at most 1 + drafts tokens, rather than graphs of their own)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, ids, positions, slots, mask, causal, k_cache, v_cache, heads: int):
        batch = DecodeGraphBatch(positions, slots, mask, causal, k_cache, v_cache)
        if heads:
            logits, states = self.model.logits_and_draft_states(ids, batch, None, heads)
        else:
            logits, states = self.model(ids, batch), None
        return logits, states, torch.stack(batch.new_k), torch.stack(batch.new_v)


class StepForward(nn.Module):
    """Transformer.forward / logits_and_draft_states over a paged step, as one module for torch.compile."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, step: StepRef,
                heads: int):
        batch = GraphBatch(positions, step)
        if heads:
            return self.model.logits_and_draft_states(ids, batch, rows, heads)
        return self.model(ids, batch, rows=rows)


class DraftForward(nn.Module):
    """Transformer.draft_logits: the MTP heads' logits at the rows requests draft from (eagerly, its few small
    ops cost more than a whole compiled decode step of a small model)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, states: torch.Tensor, heads: int) -> torch.Tensor:
        return self.model.draft_logits(states, heads)


def why_not(cfg: ServeConfig) -> str | None:
    """Why serving cannot compile with this configuration, or None when it can."""
    if not available():
        return f"torch {torch.__version__} lacks opaque objects for custom ops (torch >= 2.10 has them)"
    return None


def _own_code(module: nn.Module) -> nn.Module:
    """Give the module's forward a code object of its own. Dynamo keeps compiled graphs on the code object, and
    with the module guards dropped nothing tells two models of one class apart: a second compiled engine in a
    process would run the first one's frozen weights."""
    f = type(module).forward
    own = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__, f.__defaults__, f.__closure__)
    module.forward = types.MethodType(own, module)
    return module


def _no_duck_shapes():
    """Dynamic sizes that happen to be equal when a graph compiles (a 2-token verify step beside a 2-key
    context) would otherwise share one symbol, and the graph would recompile the first time they differ."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


class CompiledStep:
    """The compiled forward of a serving step. Weights are frozen into the graphs (serving never changes them),
    which lets inductor prepack them; with `autotune`, inductor also times its own C++ GEMM templates against
    the library kernels per weight shape at compile time and keeps the faster (for int8 weights at a few rows
    its template read the weights ~2x faster than torch._weight_int8pack_mm here; only the decode graphs of one
    sequence, see below). A graph compiles at the first call of each shape class: one token; one sequence of several;
    several sequences (token and row counts marked dynamic, so any count of two or more shares a graph); and
    for `decode`, one sequence or several, per count of new tokens per sequence."""

    def __init__(self, model: Transformer, autotune: bool = True):
        # The engine owns the model and never changes it once compiled, so the guards that re-check every module
        # attribute before each call (~0.7 ms a step for this model) are dropped; input and shape guards stay.
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        opts = {"guard_filter_fn": skip} if skip else {}
        self.general = torch.compile(_own_code(StepForward(model)), options=opts)
        self.decoder = torch.compile(_own_code(DecodeForward(model)), options=opts)
        self.drafter = torch.compile(_own_code(DraftForward(model)), options=opts)
        # Freezing is read from inductor's global config as a graph compiles (compile options do not reach it),
        # so it is on around each call only. The FX graph cache is off: with frozen weights it would pickle every
        # weight to disk per graph.
        self.options = dict(freezing=True, fx_graph_cache=False)
        # Autotuning times each GEMM at one row count per graph, and a graph of dynamic row counts runs what won
        # there at every count: a template tuned on a 512-token prefill ran 1.3x slower than oneDNN, one tuned
        # on 2-row decode steps ran 16-row ones 2x slower. So only the decode graphs of one sequence are
        # autotuned (one token, or a verify step's 1 + d): their row counts are fixed, and their matmuls, bound by
        # reading the weights, gain most (1.5-2x here; a tiny model's 2-token verify step fell from 1.87x to 1.30x
        # the cost of a one-token step).
        self.decode_options = dict(self.options, max_autotune_gemm=autotune, autotune_num_choices_displayed=0)
        self._causal: dict[int, torch.Tensor] = {}

    def __call__(self, ids, positions, rows, ref: StepRef, heads: int):
        """StepForward's forward: any step, attention by the eager custom op."""
        self._dynamic(ids, positions, rows)
        with torch._inductor.config.patch(**self.options), _no_duck_shapes():
            return self.general(ids, positions, rows, ref, heads)

    def decode(self, ids, positions, slots, mask, k_cache, v_cache, heads: int = 0):
        """DecodeForward's forward: a step of Q new tokens per sequence (paged.decode_inputs), attention in
        the graph. Returns (logits, draft states or None, new keys, new values), all at every new token; the
        caller writes the keys and values."""
        q = ids.shape[0] // slots.shape[0]
        causal = self._causal.get(q)
        if causal is None:
            causal = self._causal[q] = torch.ones(q, q, dtype=torch.bool, device=ids.device).tril()
        self._dynamic(ids, positions, slots, mask)
        torch._dynamo.maybe_mark_dynamic(slots, 1)
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        options = self.decode_options if slots.shape[0] == 1 else self.options  # one sequence: fixed shapes
        with torch._inductor.config.patch(**options), _no_duck_shapes():
            return self.decoder(ids, positions, slots, mask, causal, k_cache, v_cache, heads)

    def drafts(self, states: torch.Tensor, heads: int) -> torch.Tensor:
        """DraftForward's forward: (n, S, dim) draft states -> (n, heads, vocab) logits."""
        self._dynamic(states)
        with torch._inductor.config.patch(**self.options), _no_duck_shapes():
            return self.drafter(states, heads)

    @staticmethod
    def _dynamic(*tensors):
        for t in tensors:
            if t.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)
