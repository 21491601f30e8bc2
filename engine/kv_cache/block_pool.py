"""The pool of KV blocks: ref counts, the LRU free queue and the hash -> cached block map."""

from __future__ import annotations

import logging
from collections import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

NULL_BLOCK_ID = 0


@dataclass(slots=True, eq=False)
class KVBlock:
    """One block of `block_size` token slots in every layer's K and V cache.

    ref_count counts the sequences whose block table holds the block. At ref_count 0 it sits on
    the free queue; if it has a block_hash its contents are still a prefix-cache candidate
    until the queue hands it out again. Equality is identity (eq=False).
    """

    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    # free-queue links; both None exactly when the block is not on the queue
    prev_free: KVBlock | None = field(default=None, repr=False)
    next_free: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Doubly linked list of free blocks in eviction order: head first, tail last.

    Every operation is O(1), including removing a block from the middle, which a prefix-cache
    hit on a free block needs. Sentinel head and tail nodes remove the empty-list edge cases.
    """

    def __init__(self, blocks: abc.Sequence[KVBlock]) -> None:
        self._head = KVBlock(block_id=-1)
        self._tail = KVBlock(block_id=-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._num_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._num_blocks

    def __contains__(self, block: KVBlock) -> bool:
        return block.prev_free is not None

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not None and node is not self._tail:
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        assert block is not None and block is not self._tail, "pop from an empty free queue"
        self.remove(block)
        return block

    def append(self, block: KVBlock) -> None:
        assert block not in self, f"block {block.block_id} is already on the free queue"
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self._num_blocks += 1

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, f"block {block.block_id} is not queued"
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._num_blocks -= 1


class BlockPool:
    """Hands out blocks, counts references and keeps freed full blocks findable by hash.

    Block 0 is reserved as the null block: it is never handed out, so padded block-table
    entries (padded with 0) never alias a live block. Usable blocks: num_blocks - 1.
    Invariant: a block is on the free queue iff its ref_count is 0 (the null block aside).
    """

    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        assert num_blocks >= 2, "the pool needs the null block plus at least one usable block"
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(block_id=i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.free_queue = FreeBlockQueue(self.blocks[NULL_BLOCK_ID + 1:])
        self.cached_blocks: dict[bytes, KVBlock] = {}

    @property
    def num_usable_blocks(self) -> int:
        return len(self.blocks) - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref_count 0, cached ones included: they are evictable on demand."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by at least one sequence."""
        return (self.num_usable_blocks - self.num_free_blocks) / self.num_usable_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVBlock]:
        """Take blocks from the head of the free queue (least recently freed first), evicting
        their cached hashes; each comes back with ref_count 1, owned by the caller."""
        assert num_blocks <= self.num_free_blocks, "caller must check num_free_blocks first"
        blocks = []
        for _ in range(num_blocks):
            block = self.free_queue.popleft()
            self._evict(block)
            assert block.ref_count == 0
            block.ref_count = 1
            blocks.append(block)
        return blocks

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on prefix-cache hits; a hit on a free block takes it off the queue
        so it can no longer be evicted."""
        for block in blocks:
            if block.ref_count == 0:
                self.free_queue.remove(block)
            block.ref_count += 1

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in order; blocks reaching 0 join the queue's
        tail in that order, keeping their hash so they stay prefix-cache candidates."""
        for block in blocks:
            assert block.ref_count > 0, f"double free of block {block.block_id}"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue.append(block)

    def cache_full_blocks(self, blocks: abc.Sequence[KVBlock],
                          block_hashes: abc.Sequence[bytes]) -> None:
        """Register blocks[i] under block_hashes[i]. A block that already has a hash (a prefix
        hit) is left alone; a hash that another block already holds keeps that block, so
        one hash maps to exactly one block and the duplicate just stays unhashed."""
        if not self.enable_caching:
            return
        for block, block_hash in zip(blocks, block_hashes, strict=True):
            if block.block_hash is not None:
                assert block.block_hash == block_hash, "a cached block's prefix changed"
                continue
            if block_hash in self.cached_blocks:
                continue
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash. Refused (False) while any block is in use, since running
        sequences' blocks would silently stop being shareable mid-flight."""
        num_used = self.num_usable_blocks - self.num_free_blocks
        if num_used:
            logger.warning("prefix cache not reset: %d blocks are still in use", num_used)
            return False
        for block in self.cached_blocks.values():
            block.block_hash = None
        self.cached_blocks.clear()
        return True

    def uncache(self, block: KVBlock) -> None:
        """Forget a block's hash, so no later sequence can hit it; it stays where it is."""
        self._evict(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        # a hashed block is always the one registered under its hash (cache_full_blocks)
        evicted = self.cached_blocks.pop(block.block_hash)
        assert evicted is block
        block.block_hash = None
