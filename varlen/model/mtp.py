"""Multi-token-prediction heads (Gloeckle et al. 2024): head j (1..k) predicts token t+1+j from position t.

Each head is one transformer block over the trunk's last hidden state (before the final norm), or with
model.mtp_head = "mlp" that block's MLP half alone (a residual SwiGLU, as Medusa's heads are residual
MLPs); its output goes through the trunk's own final norm and unembedding, so a head adds one block (or
MLP) of parameters and the ordinary next-token output (j = 0) is untouched. The heads are drafts for
speculative decoding and a training signal; they never change the base logits. An mlp head sees only its
own position, so serving runs it on the one row a request drafts from, where a block head must run on
every token to keep its keys and values.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch

# F.cross_entropy's default ignore_index; the same value as data.loader.IGNORE (model may not import data).
IGNORE = -100
PREFIX = "mtp."  # state-dict keys of the heads: mtp.blocks.{j-1}.<Block parameter>


def is_head_key(name: str) -> bool:
    return name.startswith(PREFIX)


def head_targets(targets: torch.Tensor, cu_seqlens: torch.Tensor, j: int) -> torch.Tensor:
    """Targets (T,) of the next token -> targets of head j: position p gets targets[p + j] (the token
    t+1+j) when p + j lies in p's own sequence of the packed row and neither target is IGNORE, else IGNORE.

    Sequences are documents or pieces of one, so a head never learns across a document boundary; at the
    end of a piece the true token lies in the next piece and is simply not used.
    """
    T = targets.shape[0]
    if j == 0:
        return targets
    seqlens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_end = torch.repeat_interleave(cu_seqlens[1:].long(), seqlens, output_size=T)  # (T,) end of p's sequence
    shifted = torch.full_like(targets, IGNORE)
    shifted[:max(T - j, 0)] = targets[j:]
    pos = torch.arange(T, device=targets.device)
    keep = (pos + j < seq_end) & (targets != IGNORE)
    return torch.where(keep, shifted, torch.full_like(targets, IGNORE))


def head_loss_sums(head_logits: list[torch.Tensor], targets: torch.Tensor, cu_seqlens: torch.Tensor,
                   local=None) -> list[torch.Tensor]:
    """Summed cross-entropy of each head; head_logits[i] (T, vocab) belongs to head j = i + 1. With
    sequence parallelism the logits cover this rank's slice of the row: `local` cuts the row's head targets
    (a target may sit in another rank's slice, so they are made from the whole row first) to that slice."""
    local = local or (lambda x: x)
    # reduction="sum": a row where every target is IGNORE gives 0 (a mean would give NaN).
    return [F.cross_entropy(logits.float(), local(head_targets(targets, cu_seqlens, j)), reduction="sum")
            for j, logits in enumerate(head_logits, start=1)]


def head_target_counts(targets: torch.Tensor, cu_seqlens: torch.Tensor, k: int) -> list[int]:
    """Positions with a loss for heads j = 1..k (fewer than the base's: each sequence loses its last j)."""
    return [int((head_targets(targets, cu_seqlens, j) != IGNORE).sum()) for j in range(1, k + 1)]


class MTPHeads(nn.Module):
    """k blocks run side by side on the trunk's hidden states; block j-1 is head j.

    The blocks are passed in (the trunk's Block class) so this module does not import the transformer.
    Attending heads ("block") keep their keys and values in serving in paged-cache layer
    `first_cache_layer + j - 1` (first_cache_layer = n_layer), so a cache of n_layer + k layers holds trunk
    and heads; "mlp" heads read only their own position and need no cache.
    """

    def __init__(self, blocks: list[nn.Module], first_cache_layer: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.first_cache_layer = first_cache_layer
        self.attends = all(b.attends for b in blocks)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                batch: Batch | None = None, attend=None, num_heads: int | None = None) -> list[torch.Tensor]:
        """x (T, dim): the trunk's last hidden states before the final norm -> one (T, dim) per head (the first
        num_heads, default all), also before the final norm. A PagedBatch reads and writes each attending
        head's own cache layer (as does a batch with per-layer views: serving's compiled step)."""
        paged = self.attends and hasattr(batch, "layer_view")
        blocks = self.blocks[:num_heads]
        return [block(x, cos, sin, batch.layer_view(self.first_cache_layer + i) if paged else batch, attend)
                for i, block in enumerate(blocks)]


def load_with_heads(model: nn.Module, state: dict[str, torch.Tensor]) -> list[int]:
    """Load a state dict whose trunk matches `model` but which may lack some or all of its heads (a HF
    Llama, or a varlen run trained without them); heads beyond the model's are dropped.

    Each missing head starts as a copy of the trunk's last layer: that layer was trained to turn residual
    states into features for the same final norm and unembedding, and the state after it differs little
    from the state before it, so the copy sees familiar inputs and (residual path) starts near the trunk's
    own next-token output: a far better prior for token t+1+j than random logits, leaving training to
    shift it j tokens further. Returns the heads (j = 1..k) initialised this way.
    """
    own = model.state_dict()
    trunk = {k for k in own if not is_head_key(k)}
    missing = sorted(trunk - set(state))
    extra = sorted(k for k in set(state) - set(own) if not is_head_key(k))
    if missing or extra:
        raise ValueError(f"state dict does not match the model's trunk: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    copied = []
    if model.mtp is None:
        return copied
    for i, block in enumerate(model.mtp.blocks):
        prefix = f"{PREFIX}blocks.{i}."
        have = {k for k in state if k.startswith(prefix)}
        if not have:
            own_keys = block.state_dict().keys()  # an mlp head takes the layer's MLP half
            block.load_state_dict({k: v for k, v in model.layers[-1].state_dict().items() if k in own_keys})
            copied.append(i + 1)
        elif have != {k for k in own if k.startswith(prefix)}:
            raise ValueError(f"state dict holds only part of MTP head {i + 1} ({sorted(have)[:2]}...)")
    return copied


def freeze_trunk(model: nn.Module) -> int:
    """Stop gradients to every parameter except the heads' (the shared final norm and unembedding stay
    frozen too, so base logits are exactly the loaded model's). Returns the trainable parameter count."""
    trainable = 0
    for name, p in model.named_parameters():
        p.requires_grad_(is_head_key(name))
        trainable += p.numel() if p.requires_grad else 0
    return trainable
