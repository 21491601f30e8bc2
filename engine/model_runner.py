"""ModelRunner: owns the model and the KV tensors; turns a scheduled step into sampled tokens."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention.base import AttentionMetadata
from engine.config import CacheConfig
from engine.errors import EngineError
from engine.loader import LoadedModel, single_threaded_setup
from engine.models import kv_cache_spec
from engine.request import Request
from engine.sampler import SamplerOutput, SamplingMetadata, sample

logger = logging.getLogger(__name__)

# (token_id, logprob, rank) for the sampled token, then the top-k alternatives
PositionLogprobs = list[tuple[int, float, int]]


@dataclass(slots=True)
class ModelRunnerOutput:
    """Tokens sampled this step, for the requests whose computed tokens caught up."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, PositionLogprobs]


@dataclass(slots=True)
class StepInputs:
    """One flattened batch: the model's inputs and the rows that sample."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    sample_indices: torch.Tensor  # [num_sampling_seqs] int64: rows of hidden states that sample
    sampling_requests: list[Request]


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cache_config: CacheConfig) -> None:
        self.model = loaded.model
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.vocab_size = int(loaded.hf_config.vocab_size)
        self.block_size = cache_config.block_size
        spec = kv_cache_spec(loaded.hf_config)
        self.num_blocks = _num_kv_blocks(cache_config, spec.num_layers * 2 * spec.num_kv_heads
                                         * spec.head_dim * self.dtype.itemsize, self.device)
        shape = (self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        # one K and one V tensor per layer; block 0 is a valid block like any other. Zeroed
        # without starting an OpenMP team in this (setup) thread: see single_threaded_setup
        with single_threaded_setup():
            self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                               torch.zeros(shape, dtype=self.dtype, device=self.device))
                              for _ in range(spec.num_layers)]
        self.generators: dict[str, torch.Generator] = {}

    @property
    def kv_cache_bytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv_caches)

    # ---- one step -------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, requests: Sequence[Request], num_scheduled_tokens: dict[str, int],
                block_ids: dict[str, list[int]]) -> ModelRunnerOutput:
        """Run one forward pass over the scheduled tokens and sample where a request caught up.
        Each request's num_computed_tokens already includes this step's tokens."""
        inputs = self._prepare_inputs(requests, num_scheduled_tokens, block_ids)
        hidden_states = self.model(inputs.input_ids, inputs.positions, self.kv_caches,
                                   inputs.metadata)  # [num_tokens, hidden_size]
        if not inputs.sampling_requests:
            return ModelRunnerOutput({}, {})
        # logits only for the positions that sample: the lm_head is the largest matmul
        logits = self.model.compute_logits(hidden_states[inputs.sample_indices])
        sampler_output = sample(logits, self._sampling_metadata(inputs.sampling_requests))
        return _to_runner_output(inputs.sampling_requests, sampler_output)

    def _prepare_inputs(self, requests: Sequence[Request], num_scheduled_tokens: dict[str, int],
                        block_ids: dict[str, list[int]]) -> StepInputs:
        input_ids: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sampling_requests: list[Request] = []
        for request in requests:
            num_new = num_scheduled_tokens[request.request_id]
            end = request.num_computed_tokens
            input_ids.extend(request.all_token_ids[end - num_new:end])
            query_lens.append(num_new)
            seq_lens.append(end)
            if end == request.num_tokens:  # caught up: this chunk's last row samples
                sample_rows.append(len(input_ids) - 1)
                sampling_requests.append(request)
        block_tables = _pad_block_tables([block_ids[r.request_id] for r in requests])
        metadata, positions = self._build_metadata(query_lens, seq_lens, block_tables)
        return StepInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True),
            positions=positions, metadata=metadata,
            sample_indices=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sampling_requests=sampling_requests)

    def _build_metadata(self, query_lens: list[int], seq_lens: list[int],
                        block_tables: torch.Tensor) -> tuple[AttentionMetadata, torch.Tensor]:
        query_lens_t = torch.tensor(query_lens, dtype=torch.long)
        seq_lens_t = torch.tensor(seq_lens, dtype=torch.long)
        cu_seqlens_q = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        torch.cumsum(query_lens_t, dim=0, out=cu_seqlens_q[1:])
        # each new token's absolute position, and the sequence it belongs to
        seq_index = torch.repeat_interleave(torch.arange(len(query_lens)), query_lens_t)
        token_offset = torch.arange(int(query_lens_t.sum())) - cu_seqlens_q[seq_index]
        positions = (seq_lens_t - query_lens_t)[seq_index] + token_offset  # [num_tokens]
        block_numbers = block_tables[seq_index, positions // self.block_size].long()
        slot_mapping = block_numbers * self.block_size + positions % self.block_size
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device, non_blocking=True),
            cu_seqlens_q=cu_seqlens_q.to(self.device, non_blocking=True),
            seq_lens=seq_lens_t.to(torch.int32).to(self.device, non_blocking=True),
            block_tables=block_tables.to(self.device, non_blocking=True),
            max_seqlen_q=max(query_lens), max_seqlen_k=max(seq_lens),
            query_lens_cpu=query_lens, seq_lens_cpu=seq_lens)
        return metadata, positions.to(self.device, non_blocking=True)

    def _sampling_metadata(self, requests: list[Request]) -> SamplingMetadata:
        banned = [_banned_token_ids(r) for r in requests]
        return SamplingMetadata.build(
            params=[r.sampling_params for r in requests],
            prompt_token_ids=[r.prompt_token_ids for r in requests],
            output_token_ids=[r.output_token_ids for r in requests],
            generators=[self._generator(r) for r in requests],
            banned_token_ids=banned, vocab_size=self.vocab_size, device=self.device)

    def _generator(self, request: Request) -> torch.Generator | None:
        seed = request.sampling_params.seed
        if seed is None or request.sampling_params.is_greedy:
            return None
        generator = self.generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self.generators[request.request_id] = generator
        return generator

    def release(self, request_ids: Sequence[str]) -> None:
        """Forget per-request state (seeded generators) of finished requests."""
        for request_id in request_ids:
            self.generators.pop(request_id, None)


def _banned_token_ids(request: Request) -> list[int]:
    # below min_tokens, neither EOS nor a stop token id may be sampled
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return []
    eos = () if params.ignore_eos else params.eos_token_ids
    return [*eos, *params.stop_token_ids]


def _pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(t) for t in tables)
    padded = torch.zeros(len(tables), width, dtype=torch.int32)  # [num_seqs, max_num_blocks]
    for row, table in enumerate(tables):
        padded[row, :len(table)] = torch.tensor(table, dtype=torch.int32)
    return padded


def _to_runner_output(requests: list[Request], output: SamplerOutput) -> ModelRunnerOutput:
    token_ids = output.sampled_token_ids.tolist()  # the step's one host sync
    sampled = {r.request_id: t for r, t in zip(requests, token_ids, strict=True)}
    logprobs: dict[str, PositionLogprobs] = {}
    if output.logprobs is not None:
        assert output.logprob_token_ids is not None and output.sampled_token_ranks is not None
        ids, values = output.logprob_token_ids.tolist(), output.logprobs.tolist()
        ranks = output.sampled_token_ranks.tolist()
        for row, request in enumerate(requests):
            num_top = request.sampling_params.logprobs
            if num_top is None:
                continue
            entries = [(ids[row][0], values[row][0], ranks[row])]
            entries += [(ids[row][k], values[row][k], k) for k in range(1, num_top + 1)]
            logprobs[request.request_id] = entries
    return ModelRunnerOutput(sampled, logprobs)


def _num_kv_blocks(config: CacheConfig, bytes_per_token: int, device: torch.device) -> int:
    """Size the pool: an explicit count wins, else the memory budget for the device."""
    bytes_per_block = bytes_per_token * config.block_size
    if config.num_blocks is not None:
        return config.num_blocks
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # what is not used yet, less what the utilisation target keeps back
        budget = free - (1.0 - config.gpu_memory_utilization) * total
    else:
        budget = config.kv_cache_memory_gb * 1024**3
    num_blocks = int(budget // bytes_per_block)
    if num_blocks < 2:  # block 0 is the reserved null block
        raise EngineError(
            f"the KV cache budget has no room for one block ({bytes_per_block} bytes)")
    return num_blocks
