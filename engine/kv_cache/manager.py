"""KVCacheManager: each sequence's block table, prefix-cache lookups and slot allocation."""

from __future__ import annotations

import logging

from engine.errors import InvalidRequestError
from engine.kv_cache.block_pool import BlockPool, KVBlock
from engine.kv_cache.hashing import get_hash_fn, hash_sequence_blocks
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


class KVCacheManager:
    """Owns the mapping sequence -> blocks on top of a BlockPool. Pure bookkeeping: the KV
    tensors themselves live in the model runner, indexed by the block ids handed out here.

    Block 0 is the pool's reserved null block, so num_total_blocks == num_blocks - 1.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_algorithm: str = "sha256") -> None:
        if num_blocks < 2:
            raise InvalidRequestError(
                f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}",
                param="num_blocks")
        if block_size < 1:
            raise InvalidRequestError(f"block_size must be >= 1, got {block_size}",
                                      param="block_size")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._hash_fn = get_hash_fn(hash_algorithm)
        self._req_to_blocks: dict[str, list[KVBlock]] = {}
        # how many leading blocks of each sequence have been offered to the hash map already
        self._num_cached_blocks: dict[str, int] = {}
        self._num_queries = 0  # prompt tokens looked up in the prefix cache
        self._num_hits = 0  # of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_total_blocks(self) -> int:
        return self.pool.num_usable_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_ids(self, sequence_id: str) -> list[int]:
        return [block.block_id for block in self._req_to_blocks.get(sequence_id, ())]

    def get_computed_blocks(self, sequence: Sequence) -> tuple[list[KVBlock], int]:
        """Longest chain of cached full blocks that prefixes the sequence's tokens, and the
        number of tokens they cover. Takes no references: pass the result to allocate_slots
        before anything else allocates, or the blocks may be evicted meanwhile."""
        assert sequence.sequence_id not in self._req_to_blocks, "sequence already holds blocks"
        if not self.enable_prefix_caching or sequence.needs_prompt_logprobs:
            # Prompt logprobs need the logits of every prompt position, and a hit skips its
            # positions' forward pass: such a sequence recomputes its whole prompt (as vLLM
            # does). Its full blocks are still registered when allocated, for others to hit.
            return [], 0
        hash_sequence_blocks(sequence, self.block_size, self._hash_fn)
        # hit capped at num_tokens - 1 so the last token still runs and yields logits
        max_hit_blocks = (sequence.num_tokens - 1) // self.block_size
        hit_blocks: list[KVBlock] = []
        for block_hash in sequence.block_hashes[:max_hit_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hit_blocks.append(block)
        num_hit_tokens = len(hit_blocks) * self.block_size
        self._num_queries += sequence.num_tokens
        self._num_hits += num_hit_tokens
        return hit_blocks, num_hit_tokens

    def allocate_slots(self, sequence: Sequence, num_new_tokens: int,
                       new_computed_blocks: list[KVBlock] | None = None,
                       num_new_computed_tokens: int = 0) -> list[KVBlock] | None:
        """Make the sequence own blocks for num_computed_tokens + num_new_computed_tokens +
        num_new_tokens tokens, taking references on the prefix hits `new_computed_blocks`.

        Returns the freshly allocated blocks, or None, changing nothing, when the free blocks
        (evictable cached ones included) cannot cover them.
        """
        computed_blocks = new_computed_blocks or []
        assert len(computed_blocks) * self.block_size == num_new_computed_tokens
        req_blocks = self._req_to_blocks.get(sequence.sequence_id, [])
        assert not (computed_blocks and req_blocks), "prefix hits only on first allocation"
        num_tokens = sequence.num_computed_tokens + num_new_computed_tokens + num_new_tokens
        num_required = self.num_blocks_needed(num_tokens) - len(req_blocks) - len(computed_blocks)
        num_required = max(num_required, 0)
        # hits sitting on the free queue stop being free once touched
        num_free_hits = sum(1 for block in computed_blocks if block.ref_count == 0)
        if num_required > self.pool.num_free_blocks - num_free_hits:
            return None
        self._check_hits(sequence, computed_blocks)
        # touch before taking new blocks, so the new ones cannot evict the hits
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_required)
        req_blocks = self._req_to_blocks.setdefault(sequence.sequence_id, req_blocks)
        req_blocks.extend(computed_blocks)
        req_blocks.extend(new_blocks)
        if self.enable_prefix_caching:
            self._cache_full_blocks(sequence, req_blocks, num_tokens)
        return new_blocks

    def free(self, sequence: Sequence) -> None:
        """Release every block the sequence holds; a no-op if it holds none."""
        blocks = self._req_to_blocks.pop(sequence.sequence_id, None)
        self._num_cached_blocks.pop(sequence.sequence_id, None)
        if blocks is None:
            return
        # reversed: a sequence's tail blocks reach the queue head first and are evicted
        # first, since a cached suffix is useless once the prefix before it is gone
        self.pool.free_blocks(reversed(blocks))

    def trim(self, sequence: Sequence, num_tokens: int) -> None:
        """Give back the blocks past those the first `num_tokens` tokens need: after
        speculative decoding, the slots of rejected proposals. Those blocks were never hashed:
        only full blocks of a sequence's own (accepted) tokens ever are."""
        blocks = self._req_to_blocks.get(sequence.sequence_id)
        keep = self.num_blocks_needed(num_tokens)
        if blocks is None or len(blocks) <= keep:
            return
        surplus = blocks[keep:]
        del blocks[keep:]
        assert all(block.block_hash is None for block in surplus), "trimmed a hashed block"
        self.pool.free_blocks(reversed(surplus))

    def forget_unwritten_blocks(self, sequence: Sequence, num_written_tokens: int) -> list[int]:
        """After a failed forward pass: forget the hashes of the sequence's blocks from the one
        holding token `num_written_tokens` on (blocks are hashed when allocated, before the
        pass writes them, so their contents may be garbage). Returns those blocks' ids: any
        other sequence holding one hit it in this same step and read garbage too."""
        first = num_written_tokens // self.block_size
        blocks = self._req_to_blocks.get(sequence.sequence_id, [])[first:]
        for block in blocks:
            self.pool.uncache(block)
        if sequence.sequence_id in self._num_cached_blocks:
            self._num_cached_blocks[sequence.sequence_id] = min(
                self._num_cached_blocks[sequence.sequence_id], first)
        return [block.block_id for block in blocks]

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()

    def take_prefix_cache_stats(self) -> tuple[int, int]:
        """(queries, hits) in tokens since the last call; the counters restart at zero."""
        stats = (self._num_queries, self._num_hits)
        self._num_queries = self._num_hits = 0
        return stats

    def _cache_full_blocks(self, sequence: Sequence, req_blocks: list[KVBlock],
                           num_tokens: int) -> None:
        # Registered now, before the forward pass writes them: a sequence hitting them in the
        # same step is in the same batch, whose K/V writes precede attention in every layer.
        hash_sequence_blocks(sequence, self.block_size, self._hash_fn)
        num_full = min(num_tokens // self.block_size, len(sequence.block_hashes))
        num_cached = self._num_cached_blocks.get(sequence.sequence_id, 0)
        if num_full <= num_cached:
            return
        self.pool.cache_full_blocks(req_blocks[num_cached:num_full],
                                    sequence.block_hashes[num_cached:num_full])
        self._num_cached_blocks[sequence.sequence_id] = num_full

    def _check_hits(self, sequence: Sequence, computed_blocks: list[KVBlock]) -> None:
        # a hit evicted between lookup and allocation would hand over someone else's KV
        for block, block_hash in zip(computed_blocks, sequence.block_hashes, strict=False):
            assert block.block_hash == block_hash, f"stale prefix hit, block {block.block_id}"
