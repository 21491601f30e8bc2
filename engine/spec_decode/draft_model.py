"""The draft model: a small checkpoint of the target's vocabulary that drafts proposals on its
own paged KV cache, greedily.

Greedy drafting makes the draft distribution q one-hot at the proposal, so the runner's
verification (keep proposals while each equals the target's token sampled where it stands)
is the exact rejection sampler at every temperature, with no draft probabilities to carry.
The cost: at high temperature a sampled draft would match the target's draws more often than
its argmax does, so acceptance is lower than full draft-distribution rejection sampling gets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence as Sequences
from dataclasses import dataclass, field, replace

import torch

from engine.config import EngineConfig
from engine.errors import InvalidRequestError
from engine.kv_cache.manager import KVCacheManager
from engine.loader import LoadedModel, load_model
from engine.model_runner import ModelRunner, num_accepted, pad_block_tables
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


def load_draft_model(config: EngineConfig, target: LoadedModel) -> LoadedModel:
    """The draft checkpoint (config.speculative.model) on the target's device, in its dtype,
    attention backend and quantization; checked to share the target's vocabulary."""
    assert config.speculative is not None and config.speculative.model is not None
    draft = load_model(config.speculative.model, dtype=str(target.dtype).removeprefix("torch."),
                       device=str(target.device), allow_pickle=config.model.allow_pickle,
                       trust_remote_code=config.model.trust_remote_code,
                       attn_backend=target.model.attn_backend,
                       quantization=config.model.quantization)
    _check_vocabulary(draft, target)
    return draft


def _check_vocabulary(draft: LoadedModel, target: LoadedModel) -> None:
    """Proposals travel as token ids: the draft's tokenizer must map every token to the
    target's id, and the draft's embedding must cover every one of those ids."""
    target_vocab = target.tokenizer.get_vocab()
    draft_vocab = draft.tokenizer.get_vocab()
    if draft_vocab != target_vocab:
        num_differing = sum(1 for token in draft_vocab.keys() | target_vocab.keys()
                            if draft_vocab.get(token) != target_vocab.get(token))
        raise InvalidRequestError(
            f"the draft model {draft.model_dir} and the target model {target.model_dir} have "
            f"different vocabularies ({num_differing} tokens differ in id or presence): a "
            "draft must use the target's tokenizer", param="speculative_config")
    num_ids = max(target_vocab.values()) + 1
    draft_vocab_size = int(draft.hf_config.vocab_size)
    if draft_vocab_size < num_ids:
        raise InvalidRequestError(
            f"the draft model {draft.model_dir} has vocab_size {draft_vocab_size}, too few for "
            f"the {num_ids} token ids of the target model {target.model_dir}",
            param="speculative_config")


@dataclass(slots=True)
class _DraftKV:
    """What the draft's cache holds of one sequence: its first num_computed_tokens tokens,
    then spec_token_ids, the proposals fed back by the last decode passes, valid only as far
    as the verification accepted them."""

    sequence: Sequence
    num_computed_tokens: int = 0
    spec_token_ids: list[int] = field(default_factory=list)

    def settle(self) -> None:
        """After a verification: the cache stays valid over the common prefix of what it
        holds and the sequence's tokens, less the last token, which always runs again (its
        logits give the first proposal)."""
        token_ids = self.sequence.all_token_ids
        accepted = num_accepted(self.spec_token_ids, token_ids[self.num_computed_tokens:])
        self.num_computed_tokens = min(self.num_computed_tokens + accepted, len(token_ids) - 1)
        self.spec_token_ids = []


@dataclass(frozen=True, slots=True)
class _CatchUp:
    """One sequence's share of the first pass: its tokens [kv.num_computed_tokens, end)."""

    kv: _DraftKV
    end: int

    @property
    def is_caught_up(self) -> bool:
        return self.end == self.kv.sequence.num_tokens


class DraftModel:
    """The draft's model, KV cache and per-sequence cache state. Each step, one varlen pass
    catches every drafting sequence up on the tokens its cache lacks (under the step's token
    budget) and proposes the first token; k - 1 one-token passes propose the rest."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, num_blocks: int,
                 target_vocab_size: int) -> None:
        """`num_blocks`: the target's pool size. The draft holds the same sequences' tokens,
        and k - 1 proposals each, which the target's verifications need room for too."""
        self.max_model_len = loaded.max_positions
        self.runner = ModelRunner(
            loaded, replace(config, cache=replace(config.cache, num_blocks=num_blocks)),
            self.max_model_len)
        # no prefix caching: a draft block serves one sequence, and is freed with it
        self.kv_cache_manager = KVCacheManager(num_blocks, config.cache.block_size,
                                               enable_prefix_caching=False)
        # proposals must be ids the target has; inputs (target tokens) ids the draft has
        self.num_proposable_ids = min(target_vocab_size, self.runner.vocab_size)
        self.max_num_batched_tokens = config.scheduler.max_num_batched_tokens
        self.sequences: dict[str, _DraftKV] = {}
        logger.info("draft model %s: KV cache of %d blocks (%.2f GiB)", loaded.model_dir,
                    num_blocks, self.runner.kv_cache_bytes / 1024**3)

    def release(self, running: Sequences[Sequence]) -> None:
        """Free the blocks of the sequences no longer running (finished, preempted, aborted).
        Called before each step's drafting: the pool is the draft's alone, so blocks held
        from a sequence's end until then cost nothing."""
        live = {sequence.sequence_id: sequence for sequence in running}
        for sequence_id, kv in list(self.sequences.items()):
            if live.get(sequence_id) is not kv.sequence:  # a new sequence may reuse an id
                self._drop(kv.sequence)

    def _drop(self, sequence: Sequence) -> None:
        self.kv_cache_manager.free(sequence)
        del self.sequences[sequence.sequence_id]

    @torch.inference_mode()
    def propose(self, sequences: Sequences[Sequence], num_proposals: int) -> list[list[int]]:
        """num_proposals greedy proposals for each decoding sequence; [] for a sequence the
        draft cannot catch up this step (token budget, free blocks, its context limit)."""
        rows = self._catch_up_rows(sequences, num_proposals)
        proposals = self._draft(rows, num_proposals) if rows else {}
        return [proposals.get(sequence.sequence_id, []) for sequence in sequences]

    def _catch_up_rows(self, sequences: Sequences[Sequence],
                       num_proposals: int) -> list[_CatchUp]:
        rows: list[_CatchUp] = []
        budget = self.max_num_batched_tokens
        for sequence in sequences:
            if budget == 0:
                break
            row = self._catch_up(sequence, num_proposals, budget)
            if row is not None:
                rows.append(row)
                budget -= row.end - row.kv.num_computed_tokens
        return rows

    def _catch_up(self, sequence: Sequence, num_proposals: int, budget: int) -> _CatchUp | None:
        """The sequence's row in the first pass, its blocks allocated; a row cut short by the
        budget only advances the cache. None when the pool cannot hold it (it keeps its
        valid blocks) or it outgrew the draft's context: no proposals this step."""
        kv = self.sequences.get(sequence.sequence_id)
        if kv is None:
            kv = self.sequences[sequence.sequence_id] = _DraftKV(sequence)
        # the decode passes write the first k - 1 proposals after the sequence's tokens
        num_needed = sequence.num_tokens + num_proposals - 1
        if num_needed > self.max_model_len:
            self._drop(sequence)  # for good: sequences only grow
            return None
        kv.settle()
        end = min(sequence.num_tokens, kv.num_computed_tokens + budget)
        num_tokens = num_needed if end == sequence.num_tokens else end
        # allocate_slots counts on from the target's num_computed_tokens: ask the difference
        if self.kv_cache_manager.allocate_slots(
                sequence, num_tokens - sequence.num_computed_tokens) is None:
            return None
        return _CatchUp(kv, end)

    def _draft(self, rows: list[_CatchUp], num_proposals: int) -> dict[str, list[int]]:
        """Run the passes; the proposals of the rows that caught up, by sequence id."""
        block_tables = pad_block_tables([
            self.kv_cache_manager.get_block_ids(row.kv.sequence.sequence_id) for row in rows])
        caught_up = [index for index, row in enumerate(rows) if row.is_caught_up]
        last_hidden_states = self._catch_up_pass(rows, caught_up, block_tables)
        for row in rows:
            row.kv.num_computed_tokens = row.end
        if not caught_up:
            return {}
        proposals = self._decode_passes(self._argmax(last_hidden_states),
                                        [rows[index].end for index in caught_up],
                                        block_tables[caught_up], num_proposals)
        drafted = {}
        for index, row_proposals in zip(caught_up, proposals, strict=True):
            rows[index].kv.spec_token_ids = row_proposals[:-1]  # the last was never fed
            drafted[rows[index].kv.sequence.sequence_id] = row_proposals
        return drafted

    def _catch_up_pass(self, rows: list[_CatchUp], caught_up: list[int],
                       block_tables: torch.Tensor) -> torch.Tensor:
        """The first pass, over every row's missing tokens: [num_caught_up, hidden_size] the
        hidden states at the last token of each row that caught up."""
        input_ids: list[int] = []
        query_lens: list[int] = []
        for row in rows:
            input_ids.extend(row.kv.sequence.all_token_ids[row.kv.num_computed_tokens:row.end])
            query_lens.append(row.end - row.kv.num_computed_tokens)
        # ids past the draft's embedding (target padding ids) read as its last id: proposals
        # stay a function of the tokens, so verification stays exact, merely less lucky
        input_tensor = torch.tensor(input_ids, dtype=torch.long).clamp_(
            max=self.runner.vocab_size - 1)
        hidden_states = self._forward(input_tensor, query_lens, [row.end for row in rows],
                                      block_tables)
        last_rows = torch.tensor(query_lens).cumsum(0)[caught_up] - 1
        return hidden_states[last_rows.to(self.runner.device)]

    def _decode_passes(self, first_proposals: torch.Tensor, seq_lens: list[int],
                       block_tables: torch.Tensor, num_proposals: int) -> list[list[int]]:
        """k - 1 one-token passes, each feeding back the proposals of the one before:
        [num_rows][k] proposals. They stay on the device until one host sync at the end."""
        tokens = [first_proposals]  # each [num_rows]
        for _ in range(num_proposals - 1):
            seq_lens = [seq_len + 1 for seq_len in seq_lens]
            hidden_states = self._forward(tokens[-1], [1] * len(seq_lens), seq_lens,
                                          block_tables)
            tokens.append(self._argmax(hidden_states))
        return torch.stack(tokens, dim=1).tolist()

    def _forward(self, input_ids: torch.Tensor, query_lens: list[int], seq_lens: list[int],
                 block_tables: torch.Tensor) -> torch.Tensor:
        metadata, positions = self.runner.build_metadata(query_lens, seq_lens, block_tables)
        return self.runner.forward(input_ids.to(self.runner.device, non_blocking=True),
                                   positions, metadata)  # [num_tokens, hidden_size]

    def _argmax(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_rows] the draft's most likely next token at each row, among the target's ids."""
        logits = self.runner.model.compute_logits(hidden_states)  # [num_rows, vocab_size]
        return logits[:, :self.num_proposable_ids].argmax(dim=-1)
