"""The serving forward compiled with PyTorch's inductor: a whole step as one graph.

A decode step is ~120 matmuls and ~1,700 small ops (norms, RoPE, residual adds, SwiGLU, casts); run eagerly
those small ops cost a third of a batch-1 step on a 2-core CPU. Inductor fuses them into a few loops and, with
the weights frozen, prepacks every bf16 matmul for oneDNN itself (what packed.py does by hand for the eager
path).

Two families of graphs:
- decode (DecodeForward): every sequence of the step decodes one token and their contexts, padded to the
  longest, are mostly real (paged.decode_inputs). Attention runs inside the graph, so no Python runs per
  layer; the new keys and values come out of the graph and the runner writes them to the cache. Inductor
  autotunes the one-token graph's GEMMs (its own C++ templates against the library kernels): 1.5-2x faster
  batch-1 matmuls here.
- general (StepForward): any other step (prefill chunks, mixed steps, speculative verification). The paged
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
    """A step where every sequence decodes one token, attended inside the graph (no Python per layer).

    Written as elementwise products and sums over cache rows indexed by slot, not as gather + SDPA: inductor
    fuses the indexing into its loops, so each layer reads every cached key and value once, in place, into
    fp32 accumulators, where gather + SDPA copies them out and CPU SDPA then runs a tiny GEMM per sequence and
    head (2-3x slower per layer on a 16-sequence step here). Padding (contexts shorter than the longest) costs
    compute on reads of one cached row, not memory traffic; paged.decode_inputs bounds it. The graph never
    writes the cache; it returns every layer's new keys and values for the runner to write after the step (an
    in-graph write would be a mutation of a graph input)."""

    def __init__(self, positions: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor):
        self.positions, self.slots, self.mask, self.k_cache, self.v_cache = positions, slots, mask, k_cache, v_cache
        self.new_k: list[torch.Tensor] = []
        self.new_v: list[torch.Tensor] = []

    def layer_view(self, layer: int) -> int:
        return layer

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
        self.new_k.append(k)
        self.new_v.append(v)
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


class DecodeForward(nn.Module):
    """Transformer.forward over a decode-only step -> (logits, new keys, new values), (layers, B, Hkv, D) each."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, ids, positions, rows, slots, mask, k_cache, v_cache):
        batch = DecodeGraphBatch(positions, slots, mask, k_cache, v_cache)
        logits = self.model(ids, batch, rows=rows)
        return logits, torch.stack(batch.new_k), torch.stack(batch.new_v)


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


def why_not(cfg: ServeConfig, num_speculative: int) -> str | None:
    """Why serving cannot compile with this configuration, or None when it can."""
    if not available():
        return f"torch {torch.__version__} lacks opaque objects for custom ops (torch >= 2.10 has them)"
    if num_speculative:
        return "speculative decoding runs eagerly (its draft heads are not compiled yet)"
    return None


class CompiledStep:
    """The compiled forward of a serving step. Weights are frozen into the graphs (serving never changes them),
    which lets inductor prepack them; with `autotune`, inductor also times its own C++ GEMM templates against
    the library kernels per weight shape at compile time and keeps the faster (for int8 weights at a few rows
    its template read the weights ~2x faster than torch._weight_int8pack_mm here; only the one-token graph,
    see below). A graph compiles at the first call of each shape class: one token; one sequence of several;
    several sequences (token and row counts marked dynamic, so any count of two or more shares a graph); and
    for `decode`, one sequence or several."""

    def __init__(self, model: Transformer, autotune: bool = True):
        # The engine owns the model and never changes it once compiled, so the guards that re-check every module
        # attribute before each call (~0.7 ms a step for this model) are dropped; input and shape guards stay.
        skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
        opts = {"guard_filter_fn": skip} if skip else {}
        self.general = torch.compile(StepForward(model), options=opts)
        self.decoder = torch.compile(DecodeForward(model), options=opts)
        # Freezing is read from inductor's global config as a graph compiles (compile options do not reach it),
        # so it is on around each call only. The FX graph cache is off: with frozen weights it would pickle every
        # weight to disk per graph.
        self.options = dict(freezing=True, fx_graph_cache=False)
        # Autotuning times each GEMM at one row count per graph, and a graph of dynamic row counts runs what won
        # there at every count: a template tuned on a 512-token prefill ran 1.3x slower than oneDNN, one tuned
        # on 2-row decode steps ran 16-row ones 2x slower. So only the one-token decode graph is autotuned: its
        # row count is fixed, and its matmuls, bound by reading the weights, gain most (1.5-2x here).
        self.decode_options = dict(self.options, max_autotune_gemm=autotune, autotune_num_choices_displayed=0)

    def __call__(self, ids, positions, rows, ref: StepRef, heads: int):
        """StepForward's forward: any step, attention by the eager custom op."""
        self._dynamic(ids, positions, rows)
        with torch._inductor.config.patch(**self.options):
            return self.general(ids, positions, rows, ref, heads)

    def decode(self, ids, positions, rows, slots, mask, k_cache, v_cache):
        """DecodeForward's forward: a step of one new token per sequence (paged.decode_inputs), attention in
        the graph. Returns (logits, new keys, new values); the caller writes the keys and values."""
        self._dynamic(ids, positions, rows, slots, mask)
        torch._dynamo.maybe_mark_dynamic(slots, 1)
        torch._dynamo.maybe_mark_dynamic(mask, 1)
        options = self.decode_options if ids.shape[0] == 1 else self.options
        with torch._inductor.config.patch(**options):
            return self.decoder(ids, positions, rows, slots, mask, k_cache, v_cache)

    @staticmethod
    def _dynamic(*tensors):
        for t in tensors:
            if t.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)
