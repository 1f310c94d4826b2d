"""Paged KV cache bookkeeping (pure, no tensors): fixed-size blocks, reference counts, prefix caching.

A request's block_table lists its blocks in order; token t of the request lives in slot
block_table[t // block_size] * block_size + t % block_size. A full block whose K/V has been computed is
registered under a hash chained over every token up to its end, so a later request with the same prefix
reuses it (ref count + 1) instead of recomputing it. Freed blocks keep their hash until they are handed
out again, least recently freed first, so a popular prefix survives a while after its requests end.
"""
from __future__ import annotations

from collections import OrderedDict

from .request import Request


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    return hash((prev, tokens))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}                       # hash -> block id (computed full blocks)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hashed_upto: dict[str, int] = {}                  # request id -> full blocks registered
        self.num_cache_hits = 0                                # blocks reused, for /metrics and tests

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _prefix_hits(self, ids: list[int]) -> list[int]:
        """Cached blocks matching the start of `ids`; never the block holding the last token, whose logits
        the request still needs computed."""
        hits: list[int] = []
        if not self.prefix_caching:
            return hits
        h = None
        for b in range((len(ids) - 1) // self.block_size):
            tokens = tuple(ids[b * self.block_size:(b + 1) * self.block_size])
            h = chain_hash(h, tokens)
            block = self.cached.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            hits.append(block)
        return hits

    def can_allocate(self, req: Request) -> bool:
        ids = req.all_ids
        hits = self._prefix_hits(ids)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # cached but free: taken out of the free list
        return self.blocks_for(len(ids)) - len(hits) + revived <= len(self.free)

    # ------------------------------------------------------------------ actions
    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _new_block(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed
        old = self.block_hash[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hash[block] = self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def allocate(self, req: Request) -> None:
        """Blocks for every token the request holds now; a cached prefix is shared, not recomputed."""
        assert not req.block_table, f"request {req.request_id} already holds blocks"
        ids = req.all_ids
        hits = self._prefix_hits(ids)
        for b in hits:
            self._take(b)
        req.block_table = hits + [self._new_block() for _ in range(self.blocks_for(len(ids)) - len(hits))]
        req.num_cached = req.num_computed = len(hits) * self.block_size
        self.hashed_upto[req.request_id] = len(hits)
        self.num_cache_hits += len(hits)

    def can_append(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(req.block_table) <= len(self.free)

    def append(self, req: Request, num_tokens: int) -> None:
        """Grow the table to hold `num_tokens` tokens (a decode step adds at most one block)."""
        while len(req.block_table) < self.blocks_for(num_tokens):
            req.block_table.append(self._new_block())

    def truncate(self, req: Request, num_tokens: int) -> None:
        """Shrink the table to the blocks holding the first `num_tokens` tokens: blocks taken only for draft
        tokens the model rejected go back at once."""
        keep = self.blocks_for(num_tokens)
        assert keep >= self.hashed_upto.get(req.request_id, 0), "truncating a block registered in the prefix cache"
        for block in reversed(req.block_table[keep:]):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] == 0, f"draft block {block} is shared"
            # No hash to keep alive: first in line to be handed out again, so cached blocks survive longer.
            self.free[block] = None
            self.free.move_to_end(block, last=False)
        del req.block_table[keep:]

    def mark_computed(self, req: Request) -> None:
        """Register the request's full blocks whose K/V are now in the cache, so others can share them."""
        if not self.prefix_caching:
            return
        done = self.hashed_upto.get(req.request_id, 0)
        full = min(req.num_computed // self.block_size, len(req.block_table))
        if full <= done:
            return
        ids = req.all_ids
        h = self.block_hash[req.block_table[done - 1]] if done else None
        for b in range(done, full):
            tokens = tuple(ids[b * self.block_size:(b + 1) * self.block_size])
            h = chain_hash(h, tokens)
            block = req.block_table[b]
            self.block_hash[block], self.block_tokens[block] = h, tokens
            self.cached.setdefault(h, block)
        self.hashed_upto[req.request_id] = full

    def free_request(self, req: Request) -> None:
        """Give back every block of the request (finished, cancelled or preempted)."""
        for block in reversed(req.block_table):  # the tail first: the prefix, likelier shared, stays longer
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self.free[block] = None
        req.block_table = []
        self.hashed_upto.pop(req.request_id, None)

    def check(self, live: list[Request]) -> None:
        """Invariants (tests): each block's ref count equals the live tables holding it; free = ref 0."""
        counts = [0] * self.num_blocks
        for r in live:
            for b in r.block_table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts disagree with the live block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list is wrong"
