"""Metadata of one packed, flat token stream: where each sequence starts and each token's position."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    """Sequences laid end to end in one 1-D stream of T tokens.

    cu_seqlens: (n+1,) int32 offsets, cu_seqlens[0] = 0, cu_seqlens[-1] = T.
    positions:  (T,) int64, restarting at 0 at the start of every sequence.
    """
    cu_seqlens: torch.Tensor
    positions: torch.Tensor
    max_seqlen: int
    _plan: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_seqlens(cls, seqlens: list[int], device: torch.device | str = "cpu") -> "Batch":
        if not seqlens or min(seqlens) < 1:
            raise ValueError(f"every sequence needs at least one token, got lengths {seqlens[:10]}")
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(seqlens, dtype=torch.int32), 0)
        starts = torch.repeat_interleave(cu[:-1].long(), torch.tensor(seqlens))
        positions = torch.arange(int(cu[-1])) - starts
        return cls(cu.to(device), positions.to(device), max(seqlens))

    @property
    def seqlens(self) -> list[int]:
        if "seqlens" not in self._plan:
            self._plan["seqlens"] = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        return self._plan["seqlens"]

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    def to(self, device: torch.device | str) -> "Batch":
        # Only device-free facts carry over; index tensors are rebuilt on the new device.
        plan = {k: v for k, v in self._plan.items() if k == "seqlens"}
        return Batch(self.cu_seqlens.to(device), self.positions.to(device), self.max_seqlen, plan)

    def length_groups(self) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Sequences grouped by equal length, so each group runs as one dense (n, L) attention call.

        Returns (perm, groups): stream[perm] lays the groups' tokens back to back; groups lists
        (count, length) in that order. Computed once per batch and shared by every layer.
        """
        if "groups" not in self._plan:
            lens = self.seqlens
            starts = self.cu_seqlens[:-1].tolist()
            by_len: dict[int, list[int]] = {}
            for i, n in enumerate(lens):
                by_len.setdefault(n, []).append(i)
            index, groups = [], []
            for n in sorted(by_len, reverse=True):
                seqs = by_len[n]
                for i in seqs:
                    index.append(torch.arange(starts[i], starts[i] + n))
                groups.append((len(seqs), n))
            perm = torch.cat(index).to(self.positions.device)
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel(), device=perm.device)
            self._plan["groups"] = (perm, inv, groups)
        perm, _, groups = self._plan["groups"]
        return perm, groups

    def inverse_perm(self) -> torch.Tensor:
        self.length_groups()
        return self._plan["groups"][1]


@dataclass
class PagedBatch(Batch):
    """A serving step: new tokens of several sequences, whose keys and values live in a paged cache.

    Sequence i contributes seqlens[i] new tokens (a prefill chunk or one decode token) at the end of a
    context of context_lens[i] tokens. slot_mapping (T,) says where each new token's K/V is written;
    context_slots (sum of context_lens,) lists every context token's cache slot, sequence after sequence,
    so a layer gathers all contexts in one indexing op.
    k_cache / v_cache: (layers, num_slots, Hkv, D), or a list of (num_slots, Hkv, D); layer_view(i) picks layer i's.
    """
    context_lens: list[int] = field(default_factory=list)
    slot_mapping: torch.Tensor | None = None
    context_slots: torch.Tensor | None = None
    k_cache: list | torch.Tensor | None = None
    v_cache: list | torch.Tensor | None = None

    def layer_view(self, layer: int) -> "PagedBatch":
        return PagedBatch(self.cu_seqlens, self.positions, self.max_seqlen, self._plan, self.context_lens,
                          self.slot_mapping, self.context_slots, self.k_cache[layer], self.v_cache[layer])
