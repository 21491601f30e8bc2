"""Unit tests of the KV cache bookkeeping: block hashes, the free queue, the pool, the manager."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import InvalidRequestError
from engine.kv_cache.block_pool import BlockPool, FreeBlockQueue, KVBlock
from engine.kv_cache.hashing import (
    NONE_HASH,
    get_hash_fn,
    hash_block_tokens,
    hash_sequence_blocks,
)
from engine.kv_cache.manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

ROOT = Path(__file__).resolve().parents[2]


def make_sequence(sequence_id: str, token_ids: list[int]) -> Sequence:
    return Sequence(sequence_id=sequence_id, prompt_token_ids=list(token_ids),
                   sampling_params=SamplingParams(), arrival_time=0.0, max_tokens=16)


def prefill(manager: KVCacheManager, sequence: Sequence) -> list[int]:
    """Schedule a waiting sequence's whole prompt the way the scheduler does; return its ids."""
    hits, num_hit_tokens = manager.get_computed_blocks(sequence)
    num_new_tokens = sequence.num_tokens - sequence.num_computed_tokens - num_hit_tokens
    new_blocks = manager.allocate_slots(sequence, num_new_tokens, hits, num_hit_tokens)
    assert new_blocks is not None
    sequence.num_computed_tokens = sequence.num_tokens
    sequence.num_cached_tokens = num_hit_tokens
    return manager.get_block_ids(sequence.sequence_id)


def decode_step(manager: KVCacheManager, sequence: Sequence, token_id: int) -> bool:
    """Append one sampled token and allocate its slot, as a decode step does."""
    sequence.append_output_token_id(token_id)
    if manager.allocate_slots(sequence, 1) is None:
        return False
    sequence.num_computed_tokens += 1
    return True


def snapshot(manager: KVCacheManager, sequence_ids: list[str]) -> tuple[object, ...]:
    pool = manager.pool
    return (
        pool.num_free_blocks,
        [block.block_id for block in pool.free_queue],
        [(block.ref_count, block.block_hash) for block in pool.blocks],
        dict(pool.cached_blocks),
        {rid: manager.get_block_ids(rid) for rid in sequence_ids},
    )


# ---------------------------------------------------------------- hashing


def test_hash_chain_same_prefix_same_hash() -> None:
    first = hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(None, [1, 2, 3, 4])
    assert first == hash_block_tokens(NONE_HASH, [1, 2, 3, 4])
    assert hash_block_tokens(first, [5, 6, 7, 8]) == hash_block_tokens(first, [5, 6, 7, 8])


def test_hash_chain_depends_on_earlier_blocks() -> None:
    second_a = hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 4]), [5, 6, 7, 8])
    second_b = hash_block_tokens(hash_block_tokens(None, [1, 2, 3, 9]), [5, 6, 7, 8])
    assert second_a != second_b
    # same tokens as the first block's, but in second position: a different prefix
    assert hash_block_tokens(None, [5, 6, 7, 8]) != second_a


def test_hash_distinguishes_order_lengths_and_extra_keys() -> None:
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [1, 2, 0])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [1, 2], extra_keys=("a",))
    assert (hash_block_tokens(None, [1, 2], extra_keys=("a",))
            != hash_block_tokens(None, [1, 2], extra_keys=("b",)))
    # token ids past 32 bits must not wrap or collide
    assert hash_block_tokens(None, [2**32]) != hash_block_tokens(None, [0])


def test_hash_is_stable_across_processes() -> None:
    # Python's hash() is salted per process; block hashes must not be
    code = ("from engine.kv_cache.hashing import hash_block_tokens as h;"
            "print(h(h(None, [1, 2, 3]), [4, 5, 6], extra_keys=('lora', 7)).hex())")
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                                capture_output=True, text=True, check=True)
        outputs.add(result.stdout.strip())
    here = hash_block_tokens(hash_block_tokens(None, [1, 2, 3]), [4, 5, 6],
                             extra_keys=("lora", 7))
    assert outputs == {here.hex()}


def test_hash_sequence_blocks_hashes_only_full_blocks_incrementally() -> None:
    sequence = make_sequence("r", list(range(10)))
    added = hash_sequence_blocks(sequence, block_size=4)
    assert len(added) == 2 and sequence.block_hashes == added
    assert added[0] == hash_block_tokens(None, [0, 1, 2, 3])
    assert added[1] == hash_block_tokens(added[0], [4, 5, 6, 7])
    sequence.append_output_token_id(10)
    assert hash_sequence_blocks(sequence, block_size=4) == []  # 11 tokens: block 2 not full
    sequence.append_output_token_id(11)
    assert hash_sequence_blocks(sequence, block_size=4) == [
        hash_block_tokens(added[1], [8, 9, 10, 11])]
    # incremental hashing equals hashing the final sequence from scratch
    fresh = make_sequence("s", list(range(12)))
    hash_sequence_blocks(fresh, block_size=4)
    assert fresh.block_hashes == sequence.block_hashes


def test_get_hash_fn_rejects_unknown_algorithm() -> None:
    assert get_hash_fn("sha256")(b"x") != get_hash_fn("sha256")(b"y")
    with pytest.raises(InvalidRequestError):
        get_hash_fn("md5")


# ---------------------------------------------------------------- free queue


def test_free_queue_order_and_middle_removal() -> None:
    blocks = [KVBlock(block_id=i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert [b.block_id for b in queue] == [0, 1, 2, 3, 4] and len(queue) == 5
    queue.remove(blocks[2])
    assert blocks[2] not in queue and blocks[3] in queue
    assert [b.block_id for b in queue] == [0, 1, 3, 4]
    assert queue.popleft() is blocks[0]
    queue.append(blocks[2])
    queue.append(blocks[0])
    assert [b.block_id for b in queue] == [1, 3, 4, 2, 0] and len(queue) == 5
    queue.remove(blocks[0])  # the tail
    queue.remove(blocks[1])  # the head
    assert [b.block_id for b in queue] == [3, 4, 2] and len(queue) == 3
    for expected in (3, 4, 2):
        assert queue.popleft().block_id == expected
    assert len(queue) == 0 and list(queue) == []


# ---------------------------------------------------------------- block pool


def test_pool_reserves_null_block_and_counts() -> None:
    pool = BlockPool(num_blocks=5, enable_caching=True)
    assert pool.num_usable_blocks == 4 and pool.num_free_blocks == 4 and pool.usage == 0.0
    blocks = pool.get_new_blocks(4)
    assert sorted(b.block_id for b in blocks) == [1, 2, 3, 4]
    assert all(b.ref_count == 1 for b in blocks)
    assert pool.num_free_blocks == 0 and pool.usage == 1.0
    pool.free_blocks(blocks[:1])
    assert pool.num_free_blocks == 1 and pool.usage == 0.75


def test_pool_touch_shares_and_free_keeps_hash_until_reuse() -> None:
    pool = BlockPool(num_blocks=3, enable_caching=True)
    block, other = pool.get_new_blocks(2)
    pool.cache_full_blocks([block], [b"h"])
    pool.touch([block])  # a second sequence shares it
    assert block.ref_count == 2
    pool.free_blocks([block])
    assert block.ref_count == 1 and block not in pool.free_queue
    pool.free_blocks([block])
    assert block in pool.free_queue and pool.get_cached_block(b"h") is block
    pool.touch([block])  # hit on a free cached block takes it off the queue
    assert block.ref_count == 1 and block not in pool.free_queue
    pool.free_blocks([block, other])
    assert [b.block_id for b in pool.free_queue] == [block.block_id, other.block_id]
    (reused,) = pool.get_new_blocks(1)  # eviction: the hash goes with the reuse
    assert reused is block and block.block_hash is None and pool.get_cached_block(b"h") is None


def test_pool_duplicate_hash_keeps_first_block() -> None:
    pool = BlockPool(num_blocks=3, enable_caching=True)
    first, second = pool.get_new_blocks(2)
    pool.cache_full_blocks([first], [b"h"])
    pool.cache_full_blocks([second], [b"h"])
    assert pool.get_cached_block(b"h") is first and second.block_hash is None
    pool.free_blocks([second, first])
    pool.get_new_blocks(1)  # evicts `second`, which must not drop the entry for `first`
    assert pool.get_cached_block(b"h") is first


def test_pool_without_caching_registers_nothing() -> None:
    pool = BlockPool(num_blocks=3, enable_caching=False)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_blocks([block], [b"h"])
    assert block.block_hash is None and pool.get_cached_block(b"h") is None


# ---------------------------------------------------------------- manager


def test_manager_rejects_too_small_pool() -> None:
    with pytest.raises(InvalidRequestError):
        KVCacheManager(num_blocks=1, block_size=16)


def test_num_blocks_needed_is_ceil_division() -> None:
    manager = KVCacheManager(num_blocks=4, block_size=16)
    assert [manager.num_blocks_needed(n) for n in (0, 1, 15, 16, 17, 32, 33)] == [
        0, 1, 1, 1, 2, 2, 3]


def test_second_sequence_shares_64_token_prefix() -> None:
    manager = KVCacheManager(num_blocks=32, block_size=16)
    prefix = list(range(100, 164))  # 64 tokens = 4 blocks
    first = make_sequence("a", prefix + [1, 2, 3])
    first_ids = prefill(manager, first)
    second = make_sequence("b", prefix + [7, 8, 9, 10])
    hits, num_hit_tokens = manager.get_computed_blocks(second)
    assert num_hit_tokens == 64
    assert [b.block_id for b in hits] == first_ids[:4]
    second_ids = prefill(manager, second)
    assert second_ids[:4] == first_ids[:4] and second_ids[4] != first_ids[4]
    # shared by reference count, never on the free queue while held
    for block in hits:
        assert block.ref_count == 2 and block not in manager.pool.free_queue
    manager.free(first)
    assert all(block.ref_count == 1 for block in hits)


def test_hit_capped_below_num_tokens() -> None:
    manager = KVCacheManager(num_blocks=32, block_size=16)
    prompt = list(range(64))
    prefill(manager, make_sequence("a", prompt))
    # identical 64-token prompt: all 4 blocks cached, but the last token must be recomputed
    hits, num_hit_tokens = manager.get_computed_blocks(make_sequence("b", prompt))
    assert num_hit_tokens == 48 and len(hits) == 3
    # one extra token: the 4 full blocks can all be reused
    _, num_hit_tokens = manager.get_computed_blocks(make_sequence("c", prompt + [5]))
    assert num_hit_tokens == 64
    # a mismatch inside the third block stops the chain after two blocks
    _, num_hit_tokens = manager.get_computed_blocks(make_sequence("d", prompt[:40] + [999] * 30))
    assert num_hit_tokens == 32


def test_allocate_slots_out_of_blocks_changes_nothing() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=4)  # 5 usable blocks
    cached = make_sequence("a", list(range(8)))
    prefill(manager, cached)
    manager.free(cached)  # 2 cached, evictable blocks
    running = make_sequence("b", list(range(50, 62)))
    prefill(manager, running)  # 3 blocks
    sharer = make_sequence("c", list(range(8)) + list(range(20, 32)))
    hits, num_hit_tokens = manager.get_computed_blocks(sharer)
    assert num_hit_tokens == 8
    before = snapshot(manager, ["a", "b", "c"])
    # needs 3 more blocks beyond the 2 hits, but touching the hits leaves only 0 free
    assert manager.allocate_slots(sharer, 12, hits, num_hit_tokens) is None
    assert manager.allocate_slots(running, 100) is None
    assert snapshot(manager, ["a", "b", "c"]) == before


def test_free_is_idempotent() -> None:
    manager = KVCacheManager(num_blocks=8, block_size=4)
    sequence = make_sequence("a", list(range(10)))
    prefill(manager, sequence)
    assert manager.num_free_blocks == 4
    manager.free(sequence)
    manager.free(sequence)
    assert manager.num_free_blocks == 7 and manager.get_block_ids("a") == []
    assert all(block.ref_count == 0 for block in manager.pool.blocks)
    manager.free(make_sequence("never-allocated", [1]))
    assert manager.num_free_blocks == 7


def test_cached_blocks_evicted_only_when_needed_in_lru_order() -> None:
    manager = KVCacheManager(num_blocks=9, block_size=4)  # 8 usable
    old = make_sequence("old", list(range(100, 113)))  # 3 full blocks + 1 partial
    prefill(manager, old)
    newer = make_sequence("newer", list(range(200, 209)))  # 2 full + 1 partial
    prefill(manager, newer)
    manager.free(old)
    manager.free(newer)
    # one never-used block remains at the head: taking it evicts nothing
    filler = make_sequence("f1", [0])
    prefill(manager, filler)
    assert manager.get_computed_blocks(make_sequence("q1", list(range(100, 113))))[1] == 12
    assert manager.get_computed_blocks(make_sequence("q2", list(range(200, 209))))[1] == 8
    # next: old's blocks, tail first (its partial block, then block 2, then 1, then 0)
    prefill(manager, make_sequence("f2", [1] * 8))  # 2 blocks: old's partial and old's block 2
    assert manager.get_computed_blocks(make_sequence("q3", list(range(100, 113))))[1] == 8
    prefill(manager, make_sequence("f3", [2] * 4))  # 1 block: old's block 1
    assert manager.get_computed_blocks(make_sequence("q4", list(range(100, 113))))[1] == 4
    assert manager.get_computed_blocks(make_sequence("q5", list(range(200, 209))))[1] == 8


def test_recently_hit_block_moves_to_back_of_eviction_order() -> None:
    manager = KVCacheManager(num_blocks=5, block_size=4)  # 4 usable
    a = make_sequence("a", list(range(4)) + [99])
    b = make_sequence("b", list(range(10, 14)) + [99])
    prefill(manager, a)
    prefill(manager, b)
    manager.free(a)
    manager.free(b)  # queue: a's partial, a's full, b's partial, b's full
    again = make_sequence("a2", list(range(4)) + [98])
    prefill(manager, again)  # hits a's full block, takes a's partial one
    manager.free(again)  # queue: b's partial, b's full, then a2's two blocks
    prefill(manager, make_sequence("f", [5] * 8))  # takes b's two blocks
    assert manager.get_computed_blocks(make_sequence("qb", list(range(10, 14)) + [1]))[1] == 0
    assert manager.get_computed_blocks(make_sequence("qa", list(range(4)) + [1]))[1] == 4
    prefill(manager, make_sequence("g", [6] * 4))  # a2's partial block goes first
    assert manager.get_computed_blocks(make_sequence("qa2", list(range(4)) + [1]))[1] == 4
    prefill(manager, make_sequence("h", [7] * 4))  # now the pool must evict the hit block
    assert manager.get_computed_blocks(make_sequence("qa3", list(range(4)) + [1]))[1] == 0


def test_lookup_stops_at_first_missing_block() -> None:
    manager = KVCacheManager(num_blocks=6, block_size=4)  # 5 usable
    shared = list(range(8))
    second = make_sequence("second", shared + [9])
    manager.get_computed_blocks(second)
    assert manager.allocate_slots(second, 2) is not None  # block 0 not full yet: unhashed
    second.num_computed_tokens = 2
    first = make_sequence("first", shared[:4] + [9])
    prefill(manager, first)  # registers block 0's hash on first's block
    assert manager.allocate_slots(second, 7) is not None
    second.num_computed_tokens = 9
    # second's own copy of block 0 is a duplicate and stays unhashed; its block 1 is cached
    assert len(manager.pool.cached_blocks) == 2
    manager.free(first)
    prefill(manager, make_sequence("filler", [7] * 8))  # evicts first's blocks, block 0's hash
    hits, num_hit_tokens = manager.get_computed_blocks(make_sequence("probe", shared + [9]))
    # block 1 is still cached, but without block 0 it is no prefix hit
    assert (hits, num_hit_tokens) == ([], 0)


def test_decode_fills_blocks_that_become_prefix_hits() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4)
    sequence = make_sequence("a", [1, 2, 3, 4, 5, 6])
    prefill(manager, sequence)
    assert len(manager.pool.cached_blocks) == 1  # only the first block is full
    for token_id in (7, 8, 9):
        assert decode_step(manager, sequence, token_id)
    # tokens 7 and 8 are computed now; 9 is pending, so block 2 holds 1 computed token
    assert len(manager.pool.cached_blocks) == 2
    follower = make_sequence("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    hits, num_hit_tokens = manager.get_computed_blocks(follower)
    assert num_hit_tokens == 8
    assert [b.block_id for b in hits] == manager.get_block_ids("a")[:2]


def test_chunked_prefill_registers_blocks_as_chunks_fill_them() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4)
    sequence = make_sequence("a", list(range(20)))
    manager.get_computed_blocks(sequence)
    assert manager.allocate_slots(sequence, 6) is not None
    sequence.num_computed_tokens = 6
    assert len(manager.get_block_ids("a")) == 2 and len(manager.pool.cached_blocks) == 1
    new_blocks = manager.allocate_slots(sequence, 7)
    assert new_blocks is not None and len(new_blocks) == 2
    sequence.num_computed_tokens = 13
    assert len(manager.get_block_ids("a")) == 4 and len(manager.pool.cached_blocks) == 3


def test_preempted_sequence_hits_its_own_blocks() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4)
    sequence = make_sequence("a", list(range(10)))
    ids = prefill(manager, sequence)
    for token_id in (50, 51, 52):
        assert decode_step(manager, sequence, token_id)
    # preempt by recompute: free, then reschedule from scratch
    manager.free(sequence)
    sequence.num_computed_tokens = 0
    hits, num_hit_tokens = manager.get_computed_blocks(sequence)
    assert num_hit_tokens == 12  # 13 tokens: 3 full blocks, hit capped below 13
    assert [b.block_id for b in hits] == ids[:3]
    assert prefill(manager, sequence)[:3] == ids[:3]


def test_prefix_cache_stats_count_and_reset() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4)
    prefill(manager, make_sequence("a", list(range(10))))
    prefill(manager, make_sequence("b", list(range(9)) + [77, 78]))
    assert manager.take_prefix_cache_stats() == (10 + 11, 0 + 8)
    assert manager.take_prefix_cache_stats() == (0, 0)


def test_disabled_prefix_caching_never_hits() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    first = make_sequence("a", list(range(10)))
    prefill(manager, first)
    manager.free(first)
    second = make_sequence("b", list(range(10)))
    assert manager.get_computed_blocks(second) == ([], 0)
    assert manager.pool.cached_blocks == {} and second.block_hashes == []
    assert manager.take_prefix_cache_stats() == (0, 0)


def test_reset_prefix_cache_refused_while_in_use() -> None:
    manager = KVCacheManager(num_blocks=16, block_size=4)
    first = make_sequence("a", list(range(10)))
    prefill(manager, first)
    assert manager.reset_prefix_cache() is False
    assert manager.get_computed_blocks(make_sequence("b", list(range(10))))[1] == 8
    manager.free(first)
    assert manager.reset_prefix_cache() is True
    assert manager.get_computed_blocks(make_sequence("c", list(range(10))))[1] == 0
    assert all(block.block_hash is None for block in manager.pool.blocks)


def test_usage_and_totals() -> None:
    manager = KVCacheManager(num_blocks=11, block_size=4)
    assert manager.num_total_blocks == 10 and manager.usage == 0.0
    sequence = make_sequence("a", list(range(10)))
    prefill(manager, sequence)
    assert manager.usage == pytest.approx(0.3)
    assert manager.num_free_blocks + 3 == manager.num_total_blocks
    assert 0 not in manager.get_block_ids("a")  # the null block is never handed out
    manager.free(sequence)
    assert manager.usage == 0.0


def test_forget_unwritten_blocks_keeps_blocks_written_earlier() -> None:
    """After a failed forward pass, the blocks from the failed row's first position on lose
    their hashes (they were hashed when allocated, never written); earlier ones stay hits."""
    manager = KVCacheManager(num_blocks=16, block_size=4)
    shared = list(range(8))
    first = make_sequence("first", shared + [100])
    prefill(manager, first)  # blocks of [0..3], [4..7] cached and written
    second = make_sequence("second", shared + [20, 21, 22, 23, 24])
    prefill(manager, second)  # hits both shared blocks, allocates [20..23] (hashed) and a tail
    forgotten = manager.forget_unwritten_blocks(second, num_written_tokens=8)
    assert forgotten == manager.get_block_ids("second")[2:]
    third = make_sequence("third", shared + [20, 21, 22, 23, 25])
    _, num_cached = manager.get_computed_blocks(third)
    assert num_cached == 8  # the shared prefix still hits; second's own full block does not
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_forget_unwritten_blocks_also_forgets_blocks_hit_in_the_same_step() -> None:
    """A block another sequence hit in the same step is still unwritten when the pass fails:
    shared or not, it is forgotten, and its id tells the caller who else read it."""
    manager = KVCacheManager(num_blocks=16, block_size=4)
    first = make_sequence("first", list(range(9)))
    prefill(manager, first)  # allocates and hashes [0..3], [4..7] (not yet written)
    second = make_sequence("second", list(range(8)) + [50])
    prefill(manager, second)  # hits both in the same step
    forgotten = manager.forget_unwritten_blocks(first, num_written_tokens=0)
    assert set(manager.get_block_ids("second")[:2]) <= set(forgotten)
    _, num_cached = manager.get_computed_blocks(make_sequence("third", list(range(8)) + [60]))
    assert num_cached == 0
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == manager.num_total_blocks


def test_the_configured_hash_algorithm_reaches_the_manager() -> None:
    """CacheConfig.prefix_caching_hash_algo is the manager's hash, checked when configured."""
    from engine.config import CacheConfig
    from engine.errors import InvalidRequestError as ConfigError

    with pytest.raises(ConfigError, match="prefix_caching_hash_algo"):
        CacheConfig(prefix_caching_hash_algo="md5").validate()
    assert CacheConfig().validate().prefix_caching_hash_algo == "sha256"
