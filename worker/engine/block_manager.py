"""Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, ref counts, and an
automatic prefix cache.

Prefix caching (vLLM v1 / nano-vllm style): once all ``block_size`` tokens of a block are computed,
the block is registered under a hash of its tokens chained to the hash of everything before it,
rooted at the adapter version's content digest (see ``LoRAManager.digest``). A new sequence whose
leading full blocks hash the same shares those blocks (ref-counted) instead of recomputing them, so
KV computed under one adapter version is never reused under another. A freed block keeps its
content and its hash until it is needed: free cached blocks are evicted least recently freed first,
and a block a sequence still uses is never evicted.

Blocks without a cached content sit on a stack: the blocks freed last are reused first, so a cache
in memory the OS commits on first write (the CPU cache, see ``model_runner``) only grows to the most
blocks ever in use at once.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from flexllm.worker.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False):
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.free_blocks: list[int] = list(reversed(range(num_blocks)))  # popped from the end: block 0 first
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks  # the prefix hash a cached block holds
        self.cached: dict[bytes, int] = {}  # prefix hash -> the block holding its last block of tokens
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free cached blocks, least recently freed first
        self.query_tokens = 0  # prompt tokens of admitted sequences, looked up in the cache
        self.hit_tokens = 0  # of those, found in the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra blocks ``seq`` needs so that ``num_tokens`` tokens fit."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow ``seq``'s block table to hold ``num_tokens`` tokens (caller checked ``can_allocate``)."""
        for _ in range(self.blocks_needed(seq, num_tokens)):
            block = self.free_blocks.pop() if self.free_blocks else self._evict()
            self.ref_counts[block] = 1
            seq.block_table.append(block)

    def _evict(self) -> int:
        block, _ = self.evictable.popitem(last=False)
        self._uncache(block)
        return block

    def _uncache(self, block: int) -> None:
        digest = self.block_hash[block]
        if digest is not None:
            del self.cached[digest]
            self.block_hash[block] = None

    # -- prefix cache -----------------------------------------------------------------------
    def match_prefix(self, seq: Sequence, root: bytes) -> list[int]:
        """Cached blocks holding ``seq``'s leading full blocks under adapter ``root`` (``b""``: the
        base model). The block of the last token is never matched: it must be computed to sample."""
        if not self.enable_caching:
            return []
        if seq.prefix_hashes[:1] != [root]:  # first look-up, or its adapter changed content
            seq.prefix_hashes = [root]
        num_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for digest in self._prefix_hashes(seq, num_blocks)[1:num_blocks + 1]:
            block = self.cached.get(digest)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a waiting sequence sharing cached blocks ``hits`` fits ``num_tokens`` tokens."""
        revived = sum(1 for block in hits if self.ref_counts[block] == 0)  # taken off the evictable list
        return revived + max(0, -(-num_tokens // self.block_size) - len(hits)) <= self.num_free_blocks

    def admit(self, seq: Sequence, hits: list[int], num_tokens: int) -> None:
        """Start ``seq`` (no blocks yet) on the cached blocks ``hits`` (from ``match_prefix``, checked
        with ``can_admit``) and fresh blocks up to ``num_tokens`` tokens; the hit tokens count as computed."""
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_cached_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        if self.enable_caching:
            self.query_tokens += seq.num_tokens
            self.hit_tokens += seq.num_computed_tokens
        self.allocate(seq, num_tokens)

    def cache_computed(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks whose tokens are all computed, so that other sequences can share them."""
        full = seq.num_computed_tokens // self.block_size
        if not self.enable_caching or full <= seq.num_cached_blocks:
            return
        hashes = self._prefix_hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block, digest = seq.block_table[i], hashes[i + 1]
            if digest not in self.cached:  # else another sequence computed the same tokens first
                self.cached[digest] = block
                self.block_hash[block] = digest
        seq.num_cached_blocks = full

    def _prefix_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """``seq.prefix_hashes`` extended to ``num_blocks`` full blocks: entry ``i`` identifies the
        first ``i`` blocks of tokens under the adapter root (entry 0)."""
        hashes, bs = seq.prefix_hashes, self.block_size
        for i in range(len(hashes) - 1, num_blocks):
            tokens = array("q", seq.token_ids[i * bs:(i + 1) * bs]).tobytes()
            hashes.append(hashlib.sha256(hashes[-1] + tokens).digest())
        return hashes

    def free(self, seq: Sequence, keep_cache: bool = True) -> None:
        """Release ``seq``'s blocks; its computed full blocks stay cached unless ``keep_cache`` is False
        (its K/V may be bad), in which case the blocks only it held lose their cached content."""
        if keep_cache:
            self.cache_computed(seq)
        for block in reversed(seq.block_table):  # the tail blocks are evicted first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if keep_cache and self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self._uncache(block)
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.num_cached_blocks = 0

    def private_blocks(self, seq: Sequence) -> list[int]:
        """The blocks of ``seq`` that no other sequence shares."""
        return [block for block in seq.block_table if self.ref_counts[block] == 1]
