"""Float matmuls over quantized weights, for batches too large for the decode kernels: the
weight is dequantized a slice of output rows at a time, each slice multiplied while it is
still in cache. No full float copy of the weight exists (for an LM head, hundreds of MB), and
no fresh pages of one are faulted in per call, which cost more than the dequantizing."""

from __future__ import annotations

from collections.abc import Callable

import torch

CHUNK_VALUES = 1 << 21  # weight values dequantized at a time (8 MB of float32)


def linear_in_row_slices(x: torch.Tensor, shape: tuple[int, int],
                         dequantize_rows: Callable[[int, int], torch.Tensor],
                         bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias for W [N, K] = `shape`, with `dequantize_rows(start, end)` giving
    rows [start, end) of W in x's dtype; `bias` in x's dtype or None."""
    num_rows, in_features = shape
    rows_per_chunk = max(1, CHUNK_VALUES // in_features)
    if num_rows <= rows_per_chunk:
        return torch.nn.functional.linear(x, dequantize_rows(0, num_rows), bias)
    out = torch.empty(*x.shape[:-1], num_rows, dtype=x.dtype, device=x.device)
    for start in range(0, num_rows, rows_per_chunk):
        end = min(start + rows_per_chunk, num_rows)
        out[..., start:end] = torch.nn.functional.linear(
            x, dequantize_rows(start, end), None if bias is None else bias[start:end])
    return out
