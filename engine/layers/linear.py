"""Linear layers, including the fused projections (qkv, gate_up) that checkpoints store split."""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
    """One matmul for several projections of the same input (q/k/v, gate/up): a fused
    matmul is much faster on CPU than three small ones. Checkpoints store the parts as
    separate tensors; `load_shard` copies each into its row range of the fused weight."""

    def __init__(self, input_size: int, output_sizes: dict[str, int], bias: bool) -> None:
        super().__init__(input_size, sum(output_sizes.values()), bias=bias)
        self.output_sizes = dict(output_sizes)
        self.shard_ranges: dict[str, tuple[int, int]] = {}
        start = 0
        for shard_id, size in output_sizes.items():
            self.shard_ranges[shard_id] = (start, start + size)  # [start, end) rows
            start += size

    def shard_view(self, param: torch.Tensor, shard_id: str) -> torch.Tensor:
        """The rows of `param` (this layer's weight or bias) that hold shard `shard_id`."""
        start, end = self.shard_ranges[shard_id]
        return param.narrow(0, start, end - start)

    def split_output(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Split a fused output [..., sum(sizes)] into the parts, in declaration order."""
        return output.split(list(self.output_sizes.values()), dim=-1)
