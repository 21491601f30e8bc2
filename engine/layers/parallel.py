"""Tensor-parallel layers: each rank holds a slice of a matmul or an embedding, takes its part
of each full checkpoint tensor through `local_part`, and combines partial results with the
collectives of engine/distributed/parallel.py. With one rank every slice is the whole tensor
and no collective runs.

A checkpoint tensor whose shape is not the full one the layer expects is returned unchanged,
so the loader's shape check still names the mismatch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel import Parallel
from engine.kernels import w8a8
from engine.layers.linear import Linear


def take_rows(tensor: torch.Tensor, start: int, length: int, dim: int = 0) -> torch.Tensor:
    """`length` entries of `tensor` along `dim` from `start`, zeros past its end (the last
    rank's padding of the vocabulary). A view when nothing is padded."""
    size = tensor.shape[dim]
    start = min(start, size)
    available = min(length, size - start)
    part = tensor.narrow(dim, start, available)
    if available == length:
        return part
    pad_shape = list(tensor.shape)
    pad_shape[dim] = length - available
    return torch.cat([part, tensor.new_zeros(pad_shape)], dim=dim)


class ColumnParallelLinear(Linear):
    """This rank's output rows [start, start + length) of a Linear with `full_out` outputs
    (heads, intermediate rows, vocabulary); each rank's output is its slice, no collective.
    Rows past `full_out` (vocabulary padding) are zero."""

    def __init__(self, in_features: int, full_out: int, rows: tuple[int, int],
                 bias: bool) -> None:
        super().__init__(in_features, rows[1], bias=bias)
        self.full_out = full_out
        self.row_start = rows[0]

    def local_part(self, param_leaf: str, shard_id: str | None,
                   tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] != self.full_out:
            return tensor
        return take_rows(tensor, self.row_start, self.out_features)


def vocab_parallel_head(hidden_size: int, vocab_size: int, parallel: Parallel) -> Linear:
    """The untied LM head: this rank's vocabulary rows (CausalLM.compute_logits gathers)."""
    return ColumnParallelLinear(hidden_size, vocab_size, parallel.vocab_range(vocab_size),
                                bias=False)


class RowParallelLinear(Linear):
    """This rank's input columns [start, start + length) of a Linear with `full_in` inputs:
    the rank computes a partial sum over its columns, then the TP ranks all-reduce it
    (unless `reduce_output` is off: the caller reduces several partials at once, as the MoE
    block does with its shared expert). The bias is loaded on the first TP rank only (zeros
    elsewhere), so the sum adds it once and the int8/int4/prepacked paths keep their bias."""

    def __init__(self, full_in: int, out_features: int, columns: tuple[int, int], bias: bool,
                 parallel: Parallel, reduce_output: bool = True) -> None:
        super().__init__(columns[1], out_features, bias=bias)
        self.full_in = full_in
        self.column_start = columns[0]
        self.tp_rank = parallel.tp_rank
        # None: nothing to reduce (one rank, or the caller reduces)
        self.reduce_with = parallel if reduce_output and parallel.tp_size > 1 else None

    def local_part(self, param_leaf: str, shard_id: str | None,
                   tensor: torch.Tensor) -> torch.Tensor:
        if param_leaf == "bias":
            return tensor if self.tp_rank == 0 else torch.zeros_like(tensor)
        if tensor.dim() != 2 or tensor.shape[1] != self.full_in:
            return tensor
        return tensor.narrow(1, self.column_start, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.reduce_with is None else self.reduce_with.all_reduce(out)


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows `parallel.vocab_range(vocab_size)` of the token embedding (the last
    rank's rows past the vocabulary are zero). A lookup reads the local rows, zeros the tokens
    of other ranks, and all-reduces: each token's row comes from exactly one rank."""

    int8_rows: w8a8.QuantizedWeight | None = None  # the table as int8 rows (`quantize_int8`)

    def __init__(self, vocab_size: int, hidden_size: int, parallel: Parallel) -> None:
        self.vocab_start, num_rows = parallel.vocab_range(vocab_size)
        super().__init__(num_rows, hidden_size)
        self.vocab_size = vocab_size
        self.parallel = parallel

    def quantize_int8(self) -> bool:
        """Hold the table as int8 rows, one scale per token (w8a8's per-row quantization), a
        quarter of float32's bytes, where a lookup dequantizes only the rows it reads: with the
        matmuls quantized, a 150k-token vocabulary's table is otherwise the largest tensor left.
        A tied LM head must have its own copy first. False (kept) off the CPU or where the
        width is not a multiple of w8a8.BLOCK."""
        if self.int8_rows is not None:
            return True
        if self.weight.device.type != "cpu" or not w8a8.can_quantize(self.embedding_dim):
            return False
        self.int8_rows = w8a8.quantize_weight(self.weight.detach())
        self.weight = nn.Parameter(self.weight.new_empty(0, self.embedding_dim),
                                   requires_grad=False)
        return True

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.int8_rows is None:
            return F.embedding(ids, self.weight)
        rows = w8a8.embedding_rows(ids.reshape(-1), self.int8_rows, self.weight.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def local_part(self, param_leaf: str, shard_id: str | None,
                   tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] != self.vocab_size:
            return tensor
        return take_rows(tensor, self.vocab_start, self.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.tp_size == 1:
            return self._rows(input_ids)
        local_ids = input_ids - self.vocab_start
        is_local = (local_ids >= 0) & (local_ids < self.num_embeddings)
        out = self._rows(local_ids.masked_fill(~is_local, 0))
        out.masked_fill_(~is_local.unsqueeze(-1), 0)  # [num_tokens, hidden_size]
        return self.parallel.all_reduce(out)
