"""The CUDA attention backend: Triton kernels for paged K/V writes, varlen prefill and split-K
decode, with the torch reference (SDPA) for the cases the kernels do not cover."""

from __future__ import annotations

import logging

import torch

from engine.attention import triton_kernels as kernels
from engine.attention.base import AttentionMetadata, DecodePlan
from engine.attention.torch_ref import TorchAttentionBackend

logger = logging.getLogger(__name__)

_INTERPRETER_NUM_SMS = 4  # stands in for the SM count when kernels run on the CPU interpreter


class CudaAttentionBackend:
    """Writes the new K/V into the paged cache with one kernel, then attends with the decode
    kernel when every sequence has one query token, else with the varlen prefill kernel
    (which also serves the decode rows of a mixed batch); both take a layer's sliding window.
    Decode splits the context across programs when the batch alone would leave SMs idle."""

    def __init__(self, num_decode_splits: int | None = None) -> None:
        self.num_decode_splits = num_decode_splits  # None: chosen per step from the shapes
        self.fallback = TorchAttentionBackend()
        self._num_sms: dict[int, int] = {}
        self._has_warned_fallback = False

    def plan_decode(self, metadata: AttentionMetadata,
                    k_cache: torch.Tensor) -> DecodePlan | None:
        # the kernels read lengths from the device and plan nothing; the fallback plans. The
        # step's queries share the cache's device, dtype and head size, so the cache stands
        # in for them in choosing which one runs
        if kernels_apply(k_cache, k_cache):
            return None
        return self.fallback.plan_decode(metadata, k_cache)

    def write_cache(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, metadata: AttentionMetadata) -> None:
        if kernels_apply(key, k_cache):
            kernels.reshape_and_cache(key, value, k_cache, v_cache, metadata.slot_mapping)
        else:
            self.fallback.write_cache(key, value, k_cache, v_cache, metadata)

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        if not kernels_apply(query, k_cache):
            self._warn_fallback(query, k_cache)
            return self.fallback.forward(query, key, value, k_cache, v_cache, metadata, scale,
                                         sliding_window)
        kernels.reshape_and_cache(key, value, k_cache, v_cache, metadata.slot_mapping)
        if metadata.is_decode_only:
            num_splits = self.num_decode_splits or self._decode_splits(query, k_cache, metadata,
                                                                       sliding_window)
            return kernels.paged_decode_attention(query, k_cache, v_cache,
                                                  metadata.block_tables, metadata.seq_lens,
                                                  scale, num_splits, sliding_window)
        return kernels.paged_prefill_attention(query, k_cache, v_cache, metadata.block_tables,
                                               metadata.cu_seqlens_q, metadata.seq_lens,
                                               metadata.max_seqlen_q, scale, sliding_window)

    @staticmethod
    def covers(dtype: torch.dtype, head_dim: int) -> bool:
        """Whether every step of a model with this dtype and head size runs in the kernels,
        which read no host-side lengths: the condition for capturing decode in CUDA graphs
        (the torch fallback plans on the host from seq_lens_cpu)."""
        return dtype in kernels.SUPPORTED_DTYPES and head_dim <= kernels.MAX_HEAD_DIM

    def _decode_splits(self, query: torch.Tensor, k_cache: torch.Tensor,
                       metadata: AttentionMetadata, sliding_window: int | None) -> int:
        # host ints only (max_seqlen_k, shapes): choosing the grid must not sync the device.
        # A window bounds the keys one query reads, so the splits are sized to it
        max_len = min(metadata.max_seqlen_k, sliding_window or metadata.max_seqlen_k)
        return kernels.default_num_splits(metadata.num_seqs, k_cache.shape[2], max_len,
                                          self._sm_count(query.device))

    def _sm_count(self, device: torch.device) -> int:
        if device.type != "cuda":
            return _INTERPRETER_NUM_SMS
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._num_sms:
            self._num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
        return self._num_sms[index]

    def _warn_fallback(self, query: torch.Tensor, k_cache: torch.Tensor) -> None:
        if not self._has_warned_fallback:
            self._has_warned_fallback = True
            logger.warning("Triton attention does not cover dtype=%s head_dim=%d device=%s; "
                           "using the torch SDPA path", query.dtype, query.shape[-1],
                           query.device)


def kernels_apply(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the Triton kernels handle these tensors: CUDA tensors (CPU ones only under the
    interpreter), a dtype they are written for, shared by query and cache (tl.dot takes one
    dtype), and a head size that fits their tiles. Any strides are fine."""
    on_device = query.device.type == "cuda" or (kernels.IS_INTERPRETED
                                                and query.device.type == "cpu")
    return (on_device and query.dtype in kernels.SUPPORTED_DTYPES
            and k_cache.dtype == query.dtype and query.shape[-1] <= kernels.MAX_HEAD_DIM)
