"""Dense Linear weights reordered once into oneDNN's blocked layout, for serving on a CPU.

F.linear hands the plain (out, in) weight to the BLAS on every call, which then streams it in a layout chosen
for neither a one-row decode nor a prefill chunk. A decode step reads every weight once and is bound by that
read, so a layout that streams well matters more than arithmetic. On the 121 matmuls of a 125M-parameter decode
step (a 2-core EPYC, torch 2.13, 2026-12-03) prepacked weights ran 1.4x faster than F.linear at 1 row and 1.7x
at 16 rows in bf16, 1.7x and 2.0x in fp32. This is what PyTorch's own compiler does
for CPU inference with frozen weights (inductor's mkldnn linear), without compiling anything.

Serving packs bf16 weights only (see `packs` for why not fp32).

The packed copy replaces the Linear (its plain weight is freed) and is an opaque oneDNN tensor: a packed model
serves and saves (the state dict unpacks it), but does not train.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ROWS_HINT = 16  # oneDNN picks the blocked layout for this many rows: in fp32 16 beat 1 at 4-128 rows and lost 8% at 1


def packing_available(device: torch.device) -> bool:
    return (torch.device(device).type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packs(weight: torch.Tensor) -> bool:
    """Whether serving packs this weight: bf16 on a CPU with oneDNN. fp32 stays with F.linear, the kernel
    transformers runs, so that fp32 greedy output equals transformers' token for token: packed fp32 matmuls ran
    1.7-2x faster but sum in another order, and on a 30-layer model whose top logits are near-ties that turned
    9/9 equal greedy outputs into 7/9 (benchmarks/serve_engines.py, 2026-12-03)."""
    return weight.dtype == torch.bfloat16 and packing_available(weight.device)


class PackedLinear(nn.Module):
    """y = x @ weight.T with the weight prepacked for oneDNN; same dtype, same results up to summation order."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"PackedLinear takes float32 or bfloat16 weights, not {weight.dtype}")
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        # A plain attribute, not a buffer: Module.to() and state_dict() cannot handle oneDNN's opaque layout.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), ROWS_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"PackedLinear holds {self.dtype} weights, got {x.dtype} input")
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")

    def weight(self) -> torch.Tensor:
        """The plain (out, in) weight, unpacked again (a copy)."""
        return self.packed.to_dense()

    def _apply(self, fn, recurse=True):
        # Module.to()/.float()/.bfloat16() reach the weight through here: unpack, convert, pack again.
        weight = fn(self.weight())
        if not packing_available(weight.device):
            raise RuntimeError(f"a packed model stays on the CPU; load it again to move it to {weight.device}")
        if weight.dtype != self.dtype:
            self.dtype, self.packed = weight.dtype, torch.ops.mkldnn._reorder_linear_weight(weight, ROWS_HINT)
        return self

    # The state dict holds the plain weight, as a Linear's would: a packed model saves and loads like any other.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        weight = state_dict[key]
        if weight.shape != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: {tuple(weight.shape)} in the checkpoint, "
                              f"{(self.out_features, self.in_features)} in the model")
            return
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.to(self.dtype).contiguous(), ROWS_HINT)

    def __deepcopy__(self, memo) -> "PackedLinear":
        return PackedLinear(self.weight())  # oneDNN's opaque tensors have no deepcopy of their own

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.dtype}, oneDNN-packed"


def pack_linears_(model: nn.Module) -> int:
    """Replace every bias-free Linear of the model (blocks and MTP heads) and its vocab projection by a
    PackedLinear, in place, whatever their dtype (serving calls it only where `packs`). Returns how many."""
    count = 0
    if getattr(model, "output_proj", None) is None and hasattr(model, "output_weight"):
        model.output_proj = PackedLinear(model.output_weight())  # a copy: a tied embedding still needs its own
        count += 1
    output = getattr(model, "lm_head", None)  # packed above as output_proj; output_weight() still reads it
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child.bias is None and child is not output:
                setattr(module, name, PackedLinear(child.weight))
                count += 1
    return count
