"""Property tests of the KV cache: the manager against a brute-force model of slot contents."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from engine.kv_cache.block_pool import FreeBlockQueue, KVBlock
from engine.kv_cache.manager import KVCacheManager
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

ALPHABET = st.integers(min_value=0, max_value=2)  # tiny, so prefixes collide often
MAX_SEQ_LEN = 24
# shared "system prompts", so that many prompts share several whole blocks
PREFIXES = ([0] * 8, [1, 2] * 4, [2, 1, 0, 0, 1, 2])
PROMPTS = st.one_of(
    st.lists(ALPHABET, min_size=1, max_size=MAX_SEQ_LEN - 4),
    st.tuples(st.sampled_from(PREFIXES), st.lists(ALPHABET, max_size=8)).map(
        lambda parts: parts[0] + parts[1]),
)

# The content a slot should hold: the K/V of position p depends on every token up to p, so
# the model stores the whole prefix tuple(all_token_ids[:p + 1]) in each written slot.
Slot = tuple[int, ...]


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["pop", "append", "remove"]),
                              st.integers(0, 7)), max_size=60))
def test_free_queue_matches_list_model(ops: list[tuple[str, int]]) -> None:
    blocks = [KVBlock(block_id=i) for i in range(8)]
    queue = FreeBlockQueue(blocks[:4])
    model = blocks[:4]
    for op, index in ops:
        block = blocks[index]
        if op == "pop" and model:
            assert queue.popleft() is model.pop(0)
        elif op == "append" and block not in model:
            queue.append(block)
            model.append(block)
        elif op == "remove" and block in model:
            queue.remove(block)
            model.remove(block)
        assert list(queue) == model and len(queue) == len(model)
        assert all((b in queue) == (b in model) for b in blocks)


class KVCacheMachine(RuleBasedStateMachine):
    """Random admissions, chunked prefill and decode steps, speculative decode steps (1 + k
    slots, then trimmed back to the accepted tokens), finishes, aborts, preemptions and cache
    resets on a small pool, checked against a model of what every slot holds."""

    def __init__(self) -> None:
        super().__init__()
        self.manager = KVCacheManager(num_blocks=2, block_size=1)
        self.block_size = 1
        self.waiting: dict[str, Sequence] = {}
        self.running: dict[str, Sequence] = {}
        self.slots: dict[int, dict[int, Slot]] = {}  # block_id -> offset -> content
        self.hash_to_prefix: dict[bytes, Slot] = {}
        self.num_sequences = 0
        # sequences whose last step verified proposals: as the scheduler leaves them, they
        # may hold the block of their newest token (not computed yet: its slot still holds
        # the K/V of the proposal rejected there)
        self.settled: set[str] = set()

    @initialize(num_blocks=st.integers(3, 24), block_size=st.sampled_from([1, 2, 4]))
    def make_manager(self, num_blocks: int, block_size: int) -> None:
        self.manager = KVCacheManager(num_blocks=num_blocks, block_size=block_size)
        self.block_size = block_size

    # ------------------------------------------------------------ rules

    @rule(prompt=PROMPTS)
    def add_sequence(self, prompt: list[int]) -> None:
        sequence_id = f"r{self.num_sequences}"
        self.num_sequences += 1
        self.waiting[sequence_id] = Sequence(sequence_id=sequence_id, prompt_token_ids=prompt,
                                           sampling_params=SamplingParams(), arrival_time=0.0,
                                           max_tokens=MAX_SEQ_LEN)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def admit_waiting(self, data: st.DataObject) -> None:
        sequence = self.waiting[data.draw(st.sampled_from(sorted(self.waiting)))]
        expected_hit = self._brute_force_hit(sequence.all_token_ids)
        hits, num_hit_tokens = self.manager.get_computed_blocks(sequence)
        self._record_hashes(sequence)
        assert num_hit_tokens == expected_hit
        assert num_hit_tokens <= sequence.num_tokens - 1
        assert num_hit_tokens == len(hits) * self.block_size
        remaining = sequence.num_tokens - num_hit_tokens
        num_new_tokens = data.draw(st.integers(1, remaining), label="chunk")
        if self._allocate(sequence, num_new_tokens, hits, num_hit_tokens):
            del self.waiting[sequence.sequence_id]
            self.running[sequence.sequence_id] = sequence
            self._check_slots(sequence, sequence.num_computed_tokens + num_hit_tokens)
            self._compute(sequence, num_hit_tokens, num_new_tokens)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def step_running(self, data: st.DataObject) -> None:
        sequence = self.running[data.draw(st.sampled_from(sorted(self.running)))]
        remaining = sequence.num_tokens - sequence.num_computed_tokens
        if remaining == 1 and data.draw(st.booleans(), label="speculate"):
            self._speculate(sequence, data)
            return
        num_new_tokens = data.draw(st.integers(1, remaining), label="chunk")
        if self._allocate(sequence, num_new_tokens):
            self._compute(sequence, 0, num_new_tokens)
        else:  # what the scheduler does when a sequence cannot grow: preempt by recompute
            self._preempt(sequence)

    @precondition(lambda self: any(s.num_computed_tokens == s.num_tokens - 1
                                   for s in self.running.values()))
    @rule(data=st.data())
    def speculate(self, data: st.DataObject) -> None:
        decoding = sorted(sequence_id for sequence_id, s in self.running.items()
                          if s.num_computed_tokens == s.num_tokens - 1)
        self._speculate(self.running[data.draw(st.sampled_from(decoding))], data)

    def _speculate(self, sequence: Sequence, data: st.DataObject) -> None:
        """A decode row verifying k proposals, as the scheduler runs it: 1 + k slots (without
        room the proposals are dropped, changing nothing, and the row decodes plainly), K/V
        written for the last token and every proposal, then the accepted ones and one more
        token kept and the rest of the slots (and any block only they used) given back."""
        num_proposals = min(data.draw(st.integers(1, 4), label="k"),
                            MAX_SEQ_LEN - sequence.num_tokens)
        if num_proposals < 1 or not self._allocate(sequence, 1 + num_proposals):
            if self._allocate(sequence, 1):
                self._compute(sequence, 0, 1)
            else:
                self._preempt(sequence)
            return
        proposals = data.draw(st.lists(ALPHABET, min_size=num_proposals,
                                       max_size=num_proposals), label="proposals")
        self._check_unhashed_past(sequence, sequence.num_tokens)  # no proposal is hashed
        verified = sequence.all_token_ids + proposals
        block_ids = self.manager.get_block_ids(sequence.sequence_id)
        for position in range(sequence.num_computed_tokens, len(verified)):
            block_id = block_ids[position // self.block_size]
            self.slots.setdefault(block_id, {})[position % self.block_size] = tuple(
                verified[:position + 1])
        num_accepted = data.draw(st.integers(0, num_proposals), label="accepted")
        # the token drawn where a proposal was rejected differs from it
        last = (sequence.num_tokens % 3 if num_accepted == num_proposals
                else (proposals[num_accepted] + 1) % 3)
        for token_id in [*proposals[:num_accepted], last]:
            sequence.append_output_token_id(token_id)
        sequence.num_computed_tokens = sequence.num_tokens - 1
        self.manager.trim(sequence, sequence.num_tokens)  # asserts it frees no hashed block
        assert len(self.manager.get_block_ids(sequence.sequence_id)) == min(
            len(block_ids), self.manager.num_blocks_needed(sequence.num_tokens))
        if sequence.num_tokens >= MAX_SEQ_LEN:
            self.manager.free(sequence)
            del self.running[sequence.sequence_id]
        else:
            self.settled.add(sequence.sequence_id)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish_running(self, data: st.DataObject) -> None:
        sequence = self.running.pop(data.draw(st.sampled_from(sorted(self.running))))
        self.manager.free(sequence)

    @precondition(lambda self: self.running or self.waiting)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        sequence_id = data.draw(st.sampled_from(sorted({*self.running, *self.waiting})))
        sequence = self.running.pop(sequence_id, None) or self.waiting.pop(sequence_id)
        self.manager.free(sequence)
        self.manager.free(sequence)  # freeing twice must be harmless

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt(self.running[data.draw(st.sampled_from(sorted(self.running)))])

    @rule()
    def reset_prefix_cache(self) -> None:
        is_idle = not self.running
        assert self.manager.reset_prefix_cache() is is_idle
        if is_idle:
            assert self.manager.pool.cached_blocks == {}

    # ------------------------------------------------------------ simulation helpers

    def _allocate(self, sequence: Sequence, num_new_tokens: int, hits: list[KVBlock] | None = None,
                  num_hit_tokens: int = 0) -> bool:
        """allocate_slots, checking LRU order on success and no change at all on failure."""
        hit_ids = {block.block_id for block in hits or []}
        queue_ids = [b.block_id for b in self.manager.pool.free_queue if b.block_id not in hit_ids]
        num_held = len(self.manager.get_block_ids(sequence.sequence_id)) + len(hit_ids)
        before = self._snapshot()
        new_blocks = self.manager.allocate_slots(sequence, num_new_tokens, hits, num_hit_tokens)
        if new_blocks is None:
            assert self._snapshot() == before
            num_tokens = sequence.num_computed_tokens + num_hit_tokens + num_new_tokens
            needed = self.manager.num_blocks_needed(num_tokens) - num_held
            assert needed > len(queue_ids), "allocation refused although blocks were free"
            return False
        self._record_hashes(sequence)
        # the least recently freed blocks are handed out first
        assert [b.block_id for b in new_blocks] == queue_ids[:len(new_blocks)]
        return True

    def _record_hashes(self, sequence: Sequence) -> None:
        # equal block hashes <=> equal whole prefixes (the chaining property)
        for index, block_hash in enumerate(sequence.block_hashes):
            prefix = tuple(sequence.all_token_ids[:(index + 1) * self.block_size])
            assert self.hash_to_prefix.setdefault(block_hash, prefix) == prefix

    def _compute(self, sequence: Sequence, num_hit_tokens: int, num_new_tokens: int) -> None:
        """Write the new tokens' K/V into their slots; sample a token when caught up."""
        start = sequence.num_computed_tokens + num_hit_tokens
        block_ids = self.manager.get_block_ids(sequence.sequence_id)
        self.settled.discard(sequence.sequence_id)
        for position in range(start, start + num_new_tokens):
            block_id = block_ids[position // self.block_size]
            content = tuple(sequence.all_token_ids[:position + 1])
            self.slots.setdefault(block_id, {})[position % self.block_size] = content
        sequence.num_computed_tokens = start + num_new_tokens
        if sequence.num_computed_tokens < sequence.num_tokens:
            return
        if sequence.num_tokens >= MAX_SEQ_LEN:
            self.manager.free(sequence)
            del self.running[sequence.sequence_id]
        else:
            sequence.append_output_token_id(sequence.num_tokens % 3)

    def _preempt(self, sequence: Sequence) -> None:
        self.manager.free(sequence)
        self.settled.discard(sequence.sequence_id)
        sequence.num_computed_tokens = 0
        sequence.num_preemptions += 1
        del self.running[sequence.sequence_id]
        self.waiting[sequence.sequence_id] = sequence

    def _snapshot(self) -> tuple[object, ...]:
        pool = self.manager.pool
        tables = {rid: self.manager.get_block_ids(rid) for rid in {*self.running, *self.waiting}}
        return ([(b.ref_count, b.block_hash) for b in pool.blocks],
                [b.block_id for b in pool.free_queue], tables, dict(pool.cached_blocks))

    def _brute_force_hit(self, token_ids: list[int]) -> int:
        """Longest run of whole blocks, short of the last token, whose prefixes are cached."""
        cached = {self.hash_to_prefix[b.block_hash] for b in self.manager.pool.blocks
                  if b.block_hash is not None}
        num_blocks = 0
        while ((num_blocks + 1) * self.block_size <= len(token_ids) - 1
               and tuple(token_ids[:(num_blocks + 1) * self.block_size]) in cached):
            num_blocks += 1
        return num_blocks * self.block_size

    def _check_unhashed_past(self, sequence: Sequence, num_tokens: int) -> None:
        """Only blocks full of the sequence's first num_tokens tokens may carry a hash, and
        that hash is the sequence's own for the block."""
        pool = self.manager.pool
        for index, block_id in enumerate(self.manager.get_block_ids(sequence.sequence_id)):
            block_hash = pool.blocks[block_id].block_hash
            if index >= num_tokens // self.block_size:
                assert block_hash is None, f"block {block_id} of unaccepted slots is hashed"
            elif block_hash is not None:
                assert block_hash == sequence.block_hashes[index]

    def _check_slots(self, sequence: Sequence, num_tokens: int) -> None:
        block_ids = self.manager.get_block_ids(sequence.sequence_id)
        for position in range(num_tokens):
            block_id = block_ids[position // self.block_size]
            offset = position % self.block_size
            expected = tuple(sequence.all_token_ids[:position + 1])
            assert self.slots.get(block_id, {}).get(offset) == expected, (
                f"{sequence.sequence_id} position {position}: block {block_id} holds other KV")

    # ------------------------------------------------------------ invariants

    @invariant()
    def hashes_name_prefixes(self) -> None:
        for sequence in {**self.running, **self.waiting}.values():
            self._record_hashes(sequence)
        assert len(set(self.hash_to_prefix.values())) == len(self.hash_to_prefix)

    @invariant()
    def only_blocks_of_accepted_tokens_are_hashed(self) -> None:
        for sequence in self.running.values():
            self._check_unhashed_past(sequence, sequence.num_tokens)

    @invariant()
    def counts_add_up(self) -> None:
        usable = self.manager.pool.blocks[1:]
        num_used = sum(1 for b in usable if b.ref_count > 0)
        assert all(b.ref_count >= 0 for b in usable)
        assert self.manager.num_free_blocks + num_used == self.manager.num_total_blocks
        assert self.manager.usage == num_used / self.manager.num_total_blocks

    @invariant()
    def ref_counts_match_block_tables(self) -> None:
        holders: Counter[int] = Counter()
        for sequence_id, sequence in self.running.items():
            block_ids = self.manager.get_block_ids(sequence_id)
            assert len(set(block_ids)) == len(block_ids)
            num_needed = self.manager.num_blocks_needed(sequence.num_computed_tokens)
            if sequence_id in self.settled:  # the newest token's block too, if it had one
                assert num_needed <= len(block_ids) <= self.manager.num_blocks_needed(
                    sequence.num_tokens)
            else:
                assert len(block_ids) == num_needed
            holders.update(block_ids)
        for sequence_id in self.waiting:
            assert self.manager.get_block_ids(sequence_id) == []
        pool = self.manager.pool
        assert pool.null_block.block_id not in holders and pool.null_block.ref_count == 0
        for block in pool.blocks:
            assert block.ref_count == holders[block.block_id], f"block {block.block_id}"

    @invariant()
    def free_queue_holds_exactly_unreferenced_blocks(self) -> None:
        pool = self.manager.pool
        queued = [b.block_id for b in pool.free_queue]
        unreferenced = [b.block_id for b in pool.blocks[1:] if b.ref_count == 0]
        assert sorted(queued) == unreferenced and len(pool.free_queue) == len(queued)

    @invariant()
    def cache_map_is_consistent(self) -> None:
        pool = self.manager.pool
        for block_hash, block in pool.cached_blocks.items():
            assert block.block_hash == block_hash
        hashed = {b.block_id for b in pool.blocks if b.block_hash is not None}
        assert hashed == {b.block_id for b in pool.cached_blocks.values()}

    @invariant()
    def slots_hold_the_right_kv(self) -> None:
        for sequence in self.running.values():
            self._check_slots(sequence, sequence.num_computed_tokens)
        # a cached block, referenced or not, holds exactly the KV its hash names
        for block_hash, block in self.manager.pool.cached_blocks.items():
            prefix = self.hash_to_prefix[block_hash]
            for offset in range(self.block_size):
                end = len(prefix) - self.block_size + offset + 1
                assert self.slots.get(block.block_id, {}).get(offset) == prefix[:end]

    def teardown(self) -> None:
        for sequence in [*self.running.values(), *self.waiting.values()]:
            self.manager.free(sequence)
        pool = self.manager.pool
        assert self.manager.num_free_blocks == self.manager.num_total_blocks
        assert all(b.ref_count == 0 and b in pool.free_queue for b in pool.blocks[1:])


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                            deadline=None)
TestKVCacheMachine = KVCacheMachine.TestCase
