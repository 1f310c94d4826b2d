"""Paged KV cache bookkeeping (pure, no tensors): fixed-size blocks, reference counts, prefix caching.

A request's block_table lists its blocks in order; token t of the request lives in slot
block_table[t // block_size] * block_size + t % block_size. A full block whose K/V has been computed is
registered under a digest chained over every token up to its end, so a later request with the same prefix
reuses it (ref count + 1) instead of recomputing it. Freed blocks keep their digest until they are handed
out again, least recently freed first, so a popular prefix survives a while after its requests end.

A hit must mean the WHOLE prefix is equal, not just the block's own tokens: a block's K/V depends on every
token before it. A 64-bit Python hash of (parent hash, tokens) is not enough: colliding prefixes, found by
chance or crafted by a client, would read another prompt's K/V (vLLM's CVE-2025-25183). So the key is SHA-256
over the parent block's digest and the block's token ids, and a hit is also checked without trusting any
hash: the cached block must hold the same tokens and have been registered after the very block (same id,
same generation, i.e. not handed out since) that matched the previous block of this prompt. By induction a
chain of hits holds exactly the prompt's prefix, whatever the digests do.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .request import Request

ROOT = (-1, 0)  # the block_parent of a prompt's first block


def chain_digest(parent: bytes, tokens: tuple[int, ...]) -> bytes:
    """SHA-256 of the parent block's digest (b"" for the first block) and the block's ids as int64 bytes: a
    32-byte key that names the whole prefix up to the block's end."""
    # array('q') gives the same bytes as np.int64 in a third less time: this runs once per prompt block.
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_digest: list[bytes | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.generation = [0] * num_blocks                     # times each block was handed out
        self.block_parent: list[tuple[int, int] | None] = [None] * num_blocks  # (block, generation) before it
        self.cached: dict[bytes, int] = {}                     # chain digest -> block id (computed full blocks)
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hashed_upto: dict[str, int] = {}                  # request id -> full blocks registered
        # Request id -> chained digests of its first full blocks, while it holds blocks, so each block is hashed
        # once per admission whether a lookup or a registration needs it first (a request's ids only grow).
        self.digests: dict[str, list[bytes]] = {}
        # The same for the waiting request last looked up: the head of the queue is asked about every step until
        # it fits, and allocate follows can_allocate. One slot, not a dict, because a waiting request can be
        # dropped without the block manager hearing of it.
        self._probe: tuple[Request, list[bytes]] | None = None
        self.num_cache_queries = 0                             # prompt blocks looked up at allocate
        self.num_cache_hits = 0                                # of those, blocks reused; for /metrics and tests

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def cache_hit_rate(self) -> float:
        """Share of the prompt blocks looked up at allocate that came from the prefix cache; 0.0 before any."""
        return self.num_cache_hits / self.num_cache_queries if self.num_cache_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _digests_of(self, req: Request) -> list[bytes]:
        """The request's memo of chained block digests (filled lazily by _digest)."""
        digests = self.digests.get(req.request_id)
        if digests is not None:
            return digests
        if self._probe is None or self._probe[0] is not req:
            self._probe = (req, [])
        return self._probe[1]

    def _digest(self, digests: list[bytes], ids: list[int], b: int) -> bytes:
        """Digest of full block b of `ids`, computing the chain up to it where the memo stops."""
        bs = self.block_size
        for i in range(len(digests), b + 1):
            digests.append(chain_digest(digests[i - 1] if i else b"", tuple(ids[i * bs:(i + 1) * bs])))
        return digests[b]

    def _prefix_hits(self, req: Request) -> tuple[list[int], int]:
        """Cached blocks matching the start of the request's ids, and how many blocks could have matched: every
        full block but the one holding the last token, whose logits the request still needs computed."""
        if not self.prefix_caching:
            return [], 0
        ids, bs = req.all_ids, self.block_size
        num_queries = max(0, (len(ids) - 1) // bs)
        digests = self._digests_of(req)
        hits: list[int] = []
        for b in range(num_queries):
            block = self.cached.get(self._digest(digests, ids, b))
            parent = (hits[-1], self.generation[hits[-1]]) if hits else ROOT
            if (block is None or self.block_parent[block] != parent
                    or self.block_tokens[block] != tuple(ids[b * bs:(b + 1) * bs])):
                break
            hits.append(block)
        return hits, num_queries

    def can_allocate(self, req: Request) -> bool:
        hits, _ = self._prefix_hits(req)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # cached but free: taken out of the free list
        return self.blocks_for(req.num_tokens) - len(hits) + revived <= len(self.free)

    # ------------------------------------------------------------------ actions
    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _new_block(self) -> int:
        block, _ = self.free.popitem(last=False)  # least recently freed
        old = self.block_digest[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_digest[block] = self.block_tokens[block] = self.block_parent[block] = None
        self.generation[block] += 1  # children registered after its old contents no longer match it
        self.ref_counts[block] = 1
        return block

    def allocate(self, req: Request) -> None:
        """Blocks for every token the request holds now; a cached prefix is shared, not recomputed."""
        assert not req.block_table, f"request {req.request_id} already holds blocks"
        hits, num_queries = self._prefix_hits(req)
        for b in hits:
            self._take(b)
        req.block_table = hits + [self._new_block() for _ in range(self.blocks_for(req.num_tokens) - len(hits))]
        req.num_cached = req.num_computed = len(hits) * self.block_size
        self.hashed_upto[req.request_id] = len(hits)
        if self.prefix_caching:
            self.digests[req.request_id] = self._digests_of(req)  # mark_computed goes on from these
            self._probe = None
        self.num_cache_queries += num_queries
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
            # No digest to keep alive: first in line to be handed out again, so cached blocks survive longer.
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
        ids, bs = req.all_ids, self.block_size
        digests = self.digests.setdefault(req.request_id, [])
        for b in range(done, full):
            digest = self._digest(digests, ids, b)
            block, prev = req.block_table[b], req.block_table[b - 1] if b else None
            self.block_digest[block], self.block_tokens[block] = digest, tuple(ids[b * bs:(b + 1) * bs])
            self.block_parent[block] = ROOT if prev is None else (prev, self.generation[prev])
            self.cached.setdefault(digest, block)
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
        self.digests.pop(req.request_id, None)

    def check(self, live: list[Request]) -> None:
        """Invariants (tests): each block's ref count equals the live tables holding it; free = ref 0."""
        counts = [0] * self.num_blocks
        for r in live:
            for b in r.block_table:
                counts[b] += 1
        assert counts == self.ref_counts, "reference counts disagree with the live block tables"
        assert set(self.free) == {b for b in range(self.num_blocks) if counts[b] == 0}, "free list is wrong"
