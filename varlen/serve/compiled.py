"""The serving forward compiled with PyTorch's inductor: a whole step as one graph, the paged attention left eager.

A decode step is ~120 matmuls and ~1,700 small ops (norms, RoPE, residual adds, SwiGLU, casts); run eagerly
those small ops cost a third of a batch-1 step on a 2-core CPU. Inductor fuses them into a few loops and, with
the weights frozen, prepacks every bf16 matmul for oneDNN itself (what packed.py does by hand for the eager
path). The paged attention stays the eager code of model/attention/paged.py, called from the graph as one
custom op: its plan (which sequences share an SDPA call) changes every step and is no business of a compiler.

The step's PagedBatch reaches that op as an opaque reference (torch._library.opaque_object): the graph carries
it through without looking inside, so a new batch every step needs no recompile. Where that API is missing
(torch < 2.10) or the compiler fails, serving stays eager (`available`, and the engine's fallback).

Shapes: tokens per step vary (1 for a batch-1 decode, up to max_num_batched_tokens); compiled with dynamic
shapes, that is a graph for one token and one for any other count (inductor specialises size 1), plus one
per speculative head count.
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
    if cfg.quantization != "none":
        return "int8 weights run eagerly (their kernel choice per row count is not compiled yet)"
    if num_speculative:
        return "speculative decoding runs eagerly (its draft heads are not compiled yet)"
    return None


def compile_step(model: Transformer):
    """The compiled step: call it as StepForward's forward. Weights are frozen into the graph (serving never
    changes them), which lets inductor prepack them. A graph compiles at the first call of each shape class:
    one token; one sequence of several; several sequences (token and row counts marked dynamic, so any count
    of two or more shares a graph)."""
    compiled = torch.compile(StepForward(model))

    def step(ids, positions, rows, ref, heads):
        for t in (ids, positions, rows):
            if t.shape[0] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 0)
        # Freezing is read from inductor's global config as a graph compiles (compile options do not reach it),
        # so it is on around each call only. The FX graph cache is off: with frozen weights it would pickle every
        # weight to disk per graph.
        with torch._inductor.config.patch(freezing=True, fx_graph_cache=False):
            return compiled(ids, positions, rows, ref, heads)
    return step
