"""The paged KV cache's bookkeeping (pure Python, no torch): hashes, the block pool, the manager."""

from engine.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVBlock
from engine.kv_cache.hashing import NONE_HASH, hash_block_tokens, hash_sequence_blocks
from engine.kv_cache.manager import KVCacheManager

__all__ = [
    "NONE_HASH",
    "BlockPool",
    "FreeBlockQueue",
    "KVBlock",
    "KVCacheManager",
    "hash_block_tokens",
    "hash_sequence_blocks",
]
