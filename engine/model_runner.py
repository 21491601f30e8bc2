"""ModelRunner: owns the model and the KV tensors; turns a scheduled step into sampled tokens."""

from __future__ import annotations

import logging
import os
from collections import abc
from dataclasses import dataclass, field
from typing import cast

import torch

from engine.attention.base import AttentionMetadata, DecodePlan
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.cuda_graphs import DecodeGraphs
from engine.distributed.driver import DriverModel
from engine.distributed.messages import Channel
from engine.errors import EngineError, WorkerGroupError
from engine.loader import LoadedModel, single_threaded_setup
from engine.models import kv_cache_spec
from engine.models.base import CausalLM, KVCaches
from engine.outputs import PositionLogprobs
from engine.progress import stage
from engine.sampler import (
    SamplerOutput,
    SamplingMetadata,
    bad_words_banned_ids,
    compute_logprobs,
    gather_logprobs,
    sample,
)
from engine.sampling_params import MAX_LOGPROBS, SamplingParams
from engine.scheduler import ScheduledRow
from engine.structured.grammar import GrammarMatcher, fill_bitmask

logger = logging.getLogger(__name__)

# rows per LM-head slice for prompt logprobs: a long prompt never holds [P, vocab_size] fp32
# logits at once, only [PROMPT_LOGPROB_SLICE, vocab_size] (150 MiB at a 150k vocabulary)
PROMPT_LOGPROB_SLICE = 256


@dataclass(slots=True)
class ModelRunnerOutput:
    """Tokens sampled this step, for the sequences whose computed tokens caught up (one each,
    or with speculation the accepted proposals and the token sampled after them), their
    logprobs when asked for, and the prompt logprobs this pass's rows computed."""

    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[PositionLogprobs]]
    # sequence id -> logprobs of the next prompt tokens with none yet, in prompt order
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)


@dataclass(slots=True)
class PromptLogprobRows:
    """The hidden-state rows of one batch that predict a prompt token still lacking its
    logprob, for the sequences that ask for prompt logprobs. Others add nothing here."""

    hidden_indices: list[int] = field(default_factory=list)  # rows of the flattened batch
    target_token_ids: list[int] = field(default_factory=list)  # the prompt token each predicts
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (id, num_rows, num_top)

    def add(self, row: ScheduledRow, offset: int) -> None:
        """Take the row's positions whose next token is a prompt token with no logprob yet;
        `offset` is where the row's first token sits in the flattened batch. The row that
        samples the first output token is not one of them: it predicts no prompt token."""
        sequence = row.sequence
        num_top = sequence.sampling_params.prompt_logprobs
        if num_top is None or not sequence.needs_prompt_logprobs:
            return
        # the KV cache holds nothing past the committed logprobs: prefix hits are skipped
        assert row.start <= sequence.num_prompt_logprobs, "prompt logprobs would have a gap"
        # position p predicts prompt token p + 1; tokens 1 .. num_prompt_logprobs are done
        # (a recompute after preemption mid-prefill runs them again, but only for the KV)
        first = max(row.start, sequence.num_prompt_logprobs)
        end = min(row.end, sequence.num_prompt_tokens - 1)
        if first >= end:
            return
        self.hidden_indices.extend(range(offset + first - row.start, offset + end - row.start))
        self.target_token_ids.extend(sequence.prompt_token_ids[first + 1:end + 1])
        self.spans.append((sequence.sequence_id, end - first, num_top))

    @property
    def num_top(self) -> int:
        return max(num_top for _, _, num_top in self.spans)


@dataclass(slots=True)
class StepInputs:
    """One flattened batch: the model's inputs and the rows that sample."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    # rows of the model's output that sample: one per sampling row, 1 + k for a row verifying
    # k proposals (the target's distributions after each accepted-so-far prefix)
    # [num_samples] int64: the hidden rows that sample; None: every row, in order (decode)
    sample_indices: torch.Tensor | None
    sampling_rows: list[ScheduledRow]
    prompt_rows: PromptLogprobRows


class ModelRunner:
    def __init__(self, loaded: LoadedModel, config: EngineConfig, max_model_len: int, *,
                 extra_kv_bytes_per_token: int = 0) -> None:
        """`extra_kv_bytes_per_token`: the KV bytes per token of another cache with as many
        blocks as this one (a draft model's), paid from the same memory budget."""
        cache_config = config.cache
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.block_size = cache_config.block_size
        self.parallel = loaded.parallel
        spec = kv_cache_spec(loaded.hf_config, loaded.parallel)  # this rank's layers and heads
        self.kv_shape = (self.block_size, spec.num_kv_heads, spec.head_dim)  # per block
        self.num_layers = spec.num_layers
        # one generator for every row that brings no seed: from the config's seed, so that
        # the same requests in the same order get the same answers on every start, or fresh
        self.unseeded_generator = _unseeded_generator(self.device, config.model.seed)
        bytes_per_token = kv_bytes_per_token(loaded) + extra_kv_bytes_per_token
        activation_peak = 0
        if self.device.type == "cuda" and cache_config.num_blocks is None:
            activation_peak = self.profile_activation_peak(config.scheduler, max_model_len)
        # every rank of a parallel group the same pool: the smallest any rank's memory allows
        self.num_blocks = self.parallel.min_over_world(
            _num_kv_blocks(cache_config, bytes_per_token, self.device, activation_peak))
        shape = (self.num_blocks, *self.kv_shape)
        # one K and one V tensor per layer, over every block: block 0 is the KV pool's null
        # block (never handed out), so the 0s that pad block tables alias no live block.
        # Zeroed without starting an OpenMP team in this (setup) thread: see
        # single_threaded_setup
        with single_threaded_setup(), stage("allocating KV cache", log=logger):
            self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                               torch.zeros(shape, dtype=self.dtype, device=self.device))
                              for _ in range(spec.num_layers)]
        self.decode_graphs: DecodeGraphs | None = None
        if (self.device.type == "cuda" and not config.model.enforce_eager
                and self.parallel.world_size == 1 and self._graphs_supported(spec.head_dim)):
            context = min(max_model_len, self.num_blocks * self.block_size)
            self.decode_graphs = self.new_decode_graphs(config.scheduler.max_num_seqs, context)
            self.decode_graphs.capture()

    def attach_workers(self, channel: Channel) -> None:
        """Rank 0 of a parallel group: announce each model call to the workers (after the
        constructor, whose calls every rank makes on its own)."""
        self.model = cast(CausalLM, DriverModel(self.model, channel, self.kv_caches))

    def _graphs_supported(self, head_dim: int) -> bool:
        if not self.model.graph_capturable:
            logger.warning("decode runs eagerly: %s steps cannot be captured in CUDA graphs",
                           type(self.model).__name__)
            return False
        covers = getattr(self.model.attn_backend, "covers", None)
        if covers is not None and covers(self.dtype, head_dim):
            return True
        logger.warning("decode runs eagerly: the %s attention backend cannot be captured in "
                       "CUDA graphs for dtype %s, head_dim %d",
                       type(self.model.attn_backend).__name__, self.dtype, head_dim)
        return False

    def new_decode_graphs(self, max_num_seqs: int, max_model_len: int,
                          capture: bool = True) -> DecodeGraphs:
        """Decode graphs over this runner's model and KV cache (uncaptured: eager on padded
        static inputs, as the CPU tests use them)."""
        max_blocks = -(-max_model_len // self.block_size)

        def forward(input_ids: torch.Tensor, positions: torch.Tensor,
                    metadata: AttentionMetadata) -> torch.Tensor:
            return self.model(input_ids, positions, self.kv_caches, metadata)

        return DecodeGraphs(forward, max_num_seqs, max_blocks, max_model_len, self.device,
                            capture=capture)

    # ---- KV sizing on a GPU ---------------------------------------------------------------

    def profile_activation_peak(self, scheduler: SchedulerConfig, max_model_len: int) -> int:
        """Bytes the largest step the scheduler can plan allocates on top of the weights
        (CUDA): measured by running it on a scratch one-block cache."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.dummy_step(min(scheduler.max_num_batched_tokens, max_model_len),
                        scheduler.max_num_seqs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return peak

    @torch.inference_mode()
    def dummy_step(self, num_tokens: int, max_num_seqs: int,
                   prompt_logprobs: bool = True) -> torch.Tensor:
        """The heaviest step shape: one prefill of num_tokens tokens (attention's worst case)
        whose last min(max_num_seqs, num_tokens) rows go through the LM head and the sampler
        with top-k, top-p and penalties, and (`prompt_logprobs`) a slice of prompt logprobs.
        Reads and writes one scratch block only."""
        scratch = self.scratch_kv_caches()
        num_blocks = -(-num_tokens // self.block_size)
        metadata = AttentionMetadata(
            slot_mapping=torch.zeros(num_tokens, dtype=torch.long, device=self.device),
            cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(1, num_blocks, dtype=torch.int32, device=self.device),
            max_seqlen_q=num_tokens, max_seqlen_k=num_tokens, query_lens_cpu=[num_tokens],
            seq_lens_cpu=[num_tokens])
        metadata.decode_plan = self.plan_decode(metadata, scratch)
        input_ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        positions = torch.arange(num_tokens, device=self.device)
        hidden_states = self.model(input_ids, positions, scratch, metadata)
        if prompt_logprobs:
            # a slice of prompt logprobs: its [slice, vocab_size] logits may outweigh the
            # sampler's
            num_prompt_rows = min(PROMPT_LOGPROB_SLICE, num_tokens)
            self._prompt_logprob_slice(hidden_states[:num_prompt_rows],
                                       input_ids[:num_prompt_rows], MAX_LOGPROBS)
        num_rows = min(max_num_seqs, num_tokens)
        logits = self.model.compute_logits(hidden_states[-num_rows:])
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, repetition_penalty=1.1,
                                logprobs=5)
        metadata_rows = SamplingMetadata.build(
            params=[params] * num_rows, prompt_token_ids=[[0]] * num_rows,
            output_token_ids=[[0]] * num_rows, generators=[None] * num_rows,
            banned_token_ids=[[]] * num_rows, vocab_size=self.vocab_size, device=self.device)
        return sample(logits, metadata_rows).sampled_token_ids

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    # ---- one step -------------------------------------------------------------------------

    def probe(self) -> None:
        """One token through the model and the sampler on scratch KV: raises when the engine
        itself is broken, whatever the sequences."""
        self.dummy_step(1, 1)

    def execute(self, rows: abc.Sequence[ScheduledRow],
                block_ids: dict[str, list[int]]) -> ModelRunnerOutput:
        """Run one forward pass over the rows' tokens [start, end) and sample where a sequence
        caught up. `rows` may be any subset of the step's rows (the core retries a failed batch
        in groups). A pass that raises leaves the unseeded rows' generator as it was (seeded
        rows keep no state: see _seeded_generator), so the same rows can run again and draw
        the same tokens."""
        unseeded_state = self.unseeded_generator.get_state()
        try:
            return self._execute(rows, block_ids)
        except BaseException:
            self.unseeded_generator.set_state(unseeded_state)
            raise

    @torch.inference_mode()
    def _execute(self, rows: abc.Sequence[ScheduledRow],
                 block_ids: dict[str, list[int]]) -> ModelRunnerOutput:
        inputs = self._prepare_inputs(rows, block_ids)
        hidden_states = self.forward(inputs.input_ids, inputs.positions, inputs.metadata)
        prompt_logprobs = self._prompt_logprobs(hidden_states, inputs.prompt_rows)
        if not inputs.sampling_rows:
            return ModelRunnerOutput({}, {}, prompt_logprobs)
        # logits only for the positions that sample: the lm_head is the largest matmul
        sampled = (hidden_states if inputs.sample_indices is None
                   else hidden_states[inputs.sample_indices])
        logits = self.model.compute_logits(sampled)
        sampler_output = sample(logits, self._sampling_metadata(inputs.sampling_rows))
        output = _to_runner_output(inputs.sampling_rows, sampler_output)
        output.prompt_logprobs = prompt_logprobs
        return output

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """The model over one flattened batch, on this runner's KV cache: a captured decode
        graph when one fits, else eagerly. Returns [num_tokens, hidden_size]."""
        if self.decode_graphs is not None and self.decode_graphs.can_run(metadata):
            return self.decode_graphs.run(input_ids, positions, metadata)
        return self.model(input_ids, positions, self.kv_caches, metadata)

    def _prompt_logprobs(self, hidden_states: torch.Tensor,
                         rows: PromptLogprobRows) -> dict[str, list[PositionLogprobs]]:
        """Logprobs of the raw logits at the rows that predict prompt tokens, the LM head run
        over PROMPT_LOGPROB_SLICE rows at a time; one host sync for them all."""
        if not rows.spans:
            return {}
        indices = torch.tensor(rows.hidden_indices, dtype=torch.long, device=self.device)
        targets = torch.tensor(rows.target_token_ids, dtype=torch.long, device=self.device)
        size = PROMPT_LOGPROB_SLICE
        slices = [self._prompt_logprob_slice(hidden_states[indices[first:first + size]],
                                             targets[first:first + size], rows.num_top)
                  for first in range(0, len(rows.hidden_indices), size)]
        ids, values, ranks = (torch.cat(parts).tolist() for parts in zip(*slices, strict=True))
        return _split_prompt_logprobs(rows.spans, ids, values, ranks)

    def _prompt_logprob_slice(self, hidden_states: torch.Tensor, target_token_ids: torch.Tensor,
                              num_top: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids [n, 1 + num_top], logprobs [n, 1 + num_top], ranks [n]) of n rows: each row's
        prompt token first, then the top num_top, as sampled-token logprobs are gathered."""
        logits = self.model.compute_logits(hidden_states)  # [n, vocab_size] float32
        return gather_logprobs(compute_logprobs(logits), target_token_ids, num_top)

    def _prepare_inputs(self, rows: abc.Sequence[ScheduledRow],
                        block_ids: dict[str, list[int]]) -> StepInputs:
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling_rows: list[ScheduledRow] = []
        prompt_rows = PromptLogprobRows()
        for row in rows:
            sequence = row.sequence
            prompt_rows.add(row, len(input_ids))
            input_ids.extend(row.token_ids)
            query_lens.append(row.num_new_tokens)
            seq_lens.append(row.end)  # the context: cached tokens plus this row's
            num_samples = 1 + len(row.spec_token_ids)
            if row.end == sequence.num_tokens + num_samples - 1:
                # caught up: the chunk's last token samples, and so does each proposal
                sample_rows.extend(range(len(input_ids) - num_samples, len(input_ids)))
                sampling_rows.append(row)
        block_tables = pad_block_tables([block_ids[row.sequence.sequence_id] for row in rows])
        metadata, positions = self.build_metadata(query_lens, seq_lens, block_tables)
        sample_indices: torch.Tensor | None = None  # every row samples, in order
        if prompt_rows.spans or len(sample_rows) < len(input_ids):
            sample_indices = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        if not prompt_rows.spans and len(sample_rows) < len(input_ids):
            # only the sampling rows are read: the last layer computes nothing more for the
            # rest (a prefill chunk's other rows, or all of them for a chunk that samples
            # nothing), and the model returns the sampling rows alone, in order
            metadata.output_rows = sample_indices
            sample_indices = None
        return StepInputs(
            input_ids=self._on_device(torch.tensor(input_ids, dtype=torch.long)),
            positions=positions, metadata=metadata, sample_indices=sample_indices,
            sampling_rows=sampling_rows, prompt_rows=prompt_rows)

    def build_metadata(self, query_lens: list[int], seq_lens: list[int],
                       block_tables: torch.Tensor) -> tuple[AttentionMetadata, torch.Tensor]:
        """Attention metadata and positions [num_tokens] of a batch whose sequence i computes
        its last query_lens[i] of seq_lens[i] tokens, in the blocks of block_tables[i]."""
        # each new token's absolute position and cache slot, built as lists: at one stream the
        # step's torch ops run with cold caches (the weights streamed through them), 20-40 us
        # each, and these took a dozen
        block_size = self.block_size
        tables = block_tables.tolist()
        cu_seqlens: list[int] = [0]
        position_list: list[int] = []
        slots: list[int] = []
        for table, query_len, seq_len in zip(tables, query_lens, seq_lens, strict=True):
            cu_seqlens.append(cu_seqlens[-1] + query_len)
            new_positions = range(seq_len - query_len, seq_len)
            position_list += new_positions
            slots += [table[p // block_size] * block_size + p % block_size
                      for p in new_positions]
        metadata = AttentionMetadata(
            slot_mapping=self._on_device(torch.tensor(slots, dtype=torch.long)),
            cu_seqlens_q=self._on_device(torch.tensor(cu_seqlens, dtype=torch.int32)),
            seq_lens=self._on_device(torch.tensor(seq_lens, dtype=torch.int32)),
            block_tables=self._on_device(block_tables),
            max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        metadata.decode_plan = self.plan_decode(metadata, self.kv_caches)
        return metadata, self._on_device(torch.tensor(position_list, dtype=torch.long))

    def _on_device(self, host: torch.Tensor) -> torch.Tensor:
        """A host tensor of step inputs on this runner's device (asynchronously): itself on
        the CPU, without the call."""
        return host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)

    def plan_decode(self, metadata: AttentionMetadata,
                    kv_caches: KVCaches) -> DecodePlan | None:
        """The step's decode plan over `kv_caches`: once per step, here, rather than in the
        first layer, since every layer reads it (None for a stage without layers)."""
        if not kv_caches:
            return None
        return self.model.attn_backend.plan_decode(metadata, kv_caches[0][0])

    def scratch_kv_caches(self) -> KVCaches:
        """One-block K and V per layer, for passes that must not touch the real cache."""
        return [(torch.zeros(1, *self.kv_shape, dtype=self.dtype, device=self.device),
                 torch.zeros(1, *self.kv_shape, dtype=self.dtype, device=self.device))
                for _ in range(self.num_layers)]

    def _sampling_metadata(self, rows: list[ScheduledRow]) -> SamplingMetadata:
        """One sampler row per sample: a row verifying k proposals has 1 + k, the j-th seeing
        the output as if the first j proposals were accepted (penalties, bans, min_tokens
        and seeds apply to the target's distribution exactly as without speculation)."""
        if all(row.sequence.sampling_params.is_plain_greedy and not row.spec_token_ids
               and row.sequence.grammar is None for row in rows):
            return SamplingMetadata.greedy(len(rows), self.device)
        params: list[SamplingParams] = []
        prompts: list[list[int]] = []
        outputs: list[list[int]] = []
        generators: list[torch.Generator | None] = []
        banned: list[list[int]] = []
        matchers: list[GrammarMatcher | None] = []
        for row in rows:
            sequence = row.sequence
            assert sequence.grammar is None or not row.spec_token_ids, (
                "a constrained row verified proposals")
            output_token_ids = sequence.output_token_ids  # a copy: one per row, not per sample
            for num_accepted in range(1 + len(row.spec_token_ids)):
                output = (output_token_ids + list(row.spec_token_ids[:num_accepted])
                          if num_accepted else output_token_ids)
                params.append(sequence.sampling_params)
                prompts.append(sequence.prompt_token_ids)
                outputs.append(output)
                generators.append(self._seeded_generator(sequence.sampling_params, len(output)))
                banned.append(_banned_token_ids(sequence.sampling_params, output))
                matchers.append(cast(GrammarMatcher | None, sequence.grammar))
        return SamplingMetadata.build(
            params=params, prompt_token_ids=prompts, output_token_ids=outputs,
            generators=generators, banned_token_ids=banned, vocab_size=self.vocab_size,
            device=self.device, unseeded_generator=self.unseeded_generator,
            grammar_bitmask=(fill_bitmask(matchers, self.vocab_size)
                             if any(m is not None for m in matchers) else None))

    def _seeded_generator(self, params: SamplingParams,
                          position: int) -> torch.Generator | None:
        """A seeded request's generator for its output token at `position`: seeded from the
        request's seed and the position alone, so the token drawn there is the same whatever
        the batch, however often the pass is retried, and whether or not the tokens before
        it came as verified proposals."""
        if params.seed is None or params.is_greedy:
            return None
        return torch.Generator(device=self.device).manual_seed(position_seed(params.seed,
                                                                             position))


def is_fatal_error(exc: BaseException) -> bool:
    """Errors of the engine rather than of a sequence: out of memory, a device fault, a broken
    parallel group. After one the loop ends instead of failing sequences one by one."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError, WorkerGroupError)):
        return True
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    return isinstance(exc, RuntimeError) and "CUDA error" in str(exc)


def _unseeded_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The runner's generator for rows without a seed; with no seed configured, one from
    the OS, so that two starts differ (torch's global generator starts the same each time)."""
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little")
    return torch.Generator(device=device).manual_seed(seed)


def position_seed(seed: int, position: int) -> int:
    """A 64-bit seed for output position `position` of a request seeded `seed`: splitmix64 of
    the pair, so that neighbouring seeds and positions give unrelated streams."""
    value = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


_MASK64 = (1 << 64) - 1


def _banned_token_ids(params: SamplingParams, output_token_ids: list[int]) -> list[int]:
    """The bans on the token after `output_token_ids`: a bad word's last token when the output
    ends with the rest of it; below min_tokens, EOS and the stop token ids as well."""
    banned = (bad_words_banned_ids(params.bad_words_token_ids, output_token_ids)
              if params.bad_words_token_ids else [])
    if len(output_token_ids) < params.min_tokens:
        banned += () if params.ignore_eos else params.eos_token_ids
        banned += params.stop_token_ids
    return banned


def pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """The sequences' block tables as one tensor, padded with the null block 0."""
    width = max(len(t) for t in tables)
    # [num_seqs, max_num_blocks]; one tensor from padded lists, not a copy per row
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def _to_runner_output(rows: list[ScheduledRow], output: SamplerOutput) -> ModelRunnerOutput:
    """Each row's new tokens. A row verifying proposals keeps them while each equals the token
    sampled where it stands, then the first sampled token that differs (or the one after
    the last proposal). With a one-hot draft (n-gram), this is the exact rejection sampler:
    proposal x is accepted with probability p(x), and a rejection leaves a token drawn from
    p without x, renormalised (engine/spec_decode/rejection.py). Greedy rows thus get the
    target's argmax at every position."""
    token_ids = output.sampled_token_ids.tolist()  # the step's one host sync
    sampled: dict[str, list[int]] = {}
    first_samples: list[int] = []
    first = 0
    for row in rows:
        drawn = token_ids[first:first + 1 + len(row.spec_token_ids)]
        sampled[row.sequence.sequence_id] = drawn[:num_accepted(row.spec_token_ids, drawn) + 1]
        first_samples.append(first)
        first += len(drawn)
    logprobs: dict[str, list[PositionLogprobs]] = {}
    if output.logprobs is not None:
        assert output.logprob_token_ids is not None and output.sampled_token_ranks is not None
        ids, values = output.logprob_token_ids.tolist(), output.logprobs.tolist()
        ranks = output.sampled_token_ranks.tolist()
        for row, first in zip(rows, first_samples, strict=True):
            num_top = row.sequence.sampling_params.logprobs
            if num_top is None:
                continue
            samples = range(first, first + len(sampled[row.sequence.sequence_id]))
            logprobs[row.sequence.sequence_id] = [
                _position_logprobs(ids[i], values[i], ranks[i], num_top) for i in samples]
    return ModelRunnerOutput(sampled, logprobs)


def num_accepted(proposals: abc.Sequence[int], drawn: abc.Sequence[int]) -> int:
    """How many leading proposals the target drew where they stand."""
    count = 0
    for proposal, token_id in zip(proposals, drawn, strict=False):
        if proposal != token_id:
            break
        count += 1
    return count


def _position_logprobs(ids: list[int], values: list[float], rank: int,
                       num_top: int) -> PositionLogprobs:
    """One position from a gathered row: the chosen token with its rank, then the top
    num_top (the row may hold more: the batch's largest k), ranked 1 .. num_top."""
    return [(ids[0], values[0], rank)] + [(ids[k], values[k], k) for k in range(1, num_top + 1)]


def _split_prompt_logprobs(spans: list[tuple[str, int, int]], ids: list[list[int]],
                           values: list[list[float]],
                           ranks: list[int]) -> dict[str, list[PositionLogprobs]]:
    """The batch's gathered prompt rows, back to each sequence's positions, in order."""
    result: dict[str, list[PositionLogprobs]] = {}
    first = 0
    for sequence_id, num_rows, num_top in spans:
        result[sequence_id] = [_position_logprobs(ids[r], values[r], ranks[r], num_top)
                               for r in range(first, first + num_rows)]
        first += num_rows
    return result


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    """Bytes of K and V per token, over every layer (this rank's), in the model's dtype."""
    spec = kv_cache_spec(loaded.hf_config, loaded.parallel)
    return spec.num_layers * 2 * spec.num_kv_heads * spec.head_dim * loaded.dtype.itemsize


def _num_kv_blocks(config: CacheConfig, bytes_per_token: int, device: torch.device,
                   activation_peak: int = 0) -> int:
    """Size the pool: an explicit count wins, else the memory budget for the device."""
    bytes_per_block = bytes_per_token * config.block_size
    if config.num_blocks is not None:
        return config.num_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = kv_budget_bytes(total, free, config.gpu_memory_utilization, activation_peak)
        logger.info("GPU memory: %.2f GiB x utilization %.2f, less %.2f GiB in use (weights, "
                    "CUDA context, other processes) and a %.2f GiB activation peak: KV cache "
                    "budget %.2f GiB", total / 1024**3, config.gpu_memory_utilization,
                    (total - free) / 1024**3, activation_peak / 1024**3,
                    max(budget, 0) / 1024**3)
    else:
        budget = int(config.kv_cache_memory_gb * 1024**3)
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 2:  # the null block and one usable block
        raise EngineError(
            f"the KV cache budget has no room for one block ({bytes_per_block} bytes)")
    return num_blocks


def kv_budget_bytes(total: int, free: int, utilization: float, activation_peak: int) -> int:
    """What the KV cache may take on a GPU: the utilization target's share of the device,
    less what is in use already (weights, the CUDA context, other processes: total - free)
    and less the activation peak of the largest step (profiled)."""
    return int(total * utilization) - (total - free) - activation_peak
