"""The contract every decoder implements for the model runner, and shared weight loading."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.errors import UnsupportedModelError
from engine.layers.linear import Linear, MergedLinear, prepack_linears, quantize_linears

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """What the KV cache needs per layer; the runner sizes the cache tensors from it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True, slots=True)
class WeightTarget:
    """Where one checkpoint tensor goes: a parameter, and for fused layers which part."""

    param_name: str
    shard_id: str | None = None


# Maps a checkpoint tensor name to its target; None means "known and deliberately skipped".
NameMapper = Callable[[str], WeightTarget | None]


class CausalLM(nn.Module):
    """Base of every decoder. Subclasses build their modules, implement `forward`,
    `map_weight_name`, `output_embedding` and `kv_cache_spec`."""

    def __init__(self, hf_config: transformers.PretrainedConfig,
                 attn_backend: AttentionBackend) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.attn_backend = attn_backend
        self.tied_output_head: Linear | None = None  # packed or int8 copy of a tied LM head (CPU)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def kv_cache_spec(cls, hf_config: transformers.PretrainedConfig) -> KVCacheSpec:
        raise NotImplementedError

    def map_weight_name(self, name: str) -> WeightTarget | None:
        raise NotImplementedError

    def output_embedding(self) -> torch.Tensor:
        """The [vocab_size, hidden_size] matrix of the LM head (the input embedding if tied)."""
        raise NotImplementedError

    def output_head(self) -> Linear | None:
        """The untied LM head layer, if the model has one (None: tied to the embedding)."""
        return None

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, hidden_size] -> [n, vocab_size] float32; the matmul runs in the model dtype."""
        head = self.output_head() or self.tied_output_head
        if head is not None:
            return head(hidden_states).float()
        return F.linear(hidden_states, self.output_embedding()).float()

    def prepack_weights(self) -> int:
        """Move every matmul weight not already int8 into oneDNN's prepacked layout (CPU bf16
        inference). A tied LM head gets a packed copy: the embedding lookup still needs the
        dense table. Returns how many weights were packed."""
        if self.output_head() is None and self.tied_output_head is None:
            self.tied_output_head = Linear.packed_from(self.output_embedding())
        return prepack_linears(self)

    def quantize_weights_int8(self) -> tuple[int, int]:
        """Quantize every matmul weight the int8 kernel can take (CPU); a tied LM head gets an
        int8 copy. Returns (quantized, left in the model dtype)."""
        if self.output_head() is None and self.tied_output_head is None:
            self.tied_output_head = Linear.int8_from(self.output_embedding())
        return quantize_linears(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the parameters, converting dtype and device
        per tensor; every parameter (every shard of a fused one) must be written once."""
        load_named_weights(self, weights, self.map_weight_name)


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       map_name: NameMapper) -> None:
    params = dict(model.named_parameters())
    expected = _expected_targets(model)
    loaded: set[tuple[str, str | None]] = set()
    with torch.no_grad():
        for name, tensor in weights:
            target = map_name(name)
            if target is None:
                continue
            param = params.get(target.param_name)
            if param is None:
                raise UnsupportedModelError(f"unexpected tensor {name!r} in the checkpoint")
            destination = _destination(model, target, param)
            if tensor.shape != destination.shape:
                raise UnsupportedModelError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(destination.shape)}: config.json does not match the weights")
            destination.copy_(tensor)
            loaded.add((target.param_name, target.shard_id))
    missing = sorted(f"{p}[{s}]" if s else p for p, s in expected - loaded)
    if missing:
        raise UnsupportedModelError(
            f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")


def _expected_targets(model: nn.Module) -> set[tuple[str, str | None]]:
    expected: set[tuple[str, str | None]] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for param_name, _ in module.named_parameters(recurse=False):
            shard_ids = module.shard_ranges if isinstance(module, MergedLinear) else [None]
            expected.update((prefix + param_name, shard_id) for shard_id in shard_ids)
    return expected


def _destination(model: nn.Module, target: WeightTarget, param: torch.Tensor) -> torch.Tensor:
    if target.shard_id is None:
        return param.data
    module = model.get_submodule(target.param_name.rpartition(".")[0])
    assert isinstance(module, MergedLinear), target  # the name mapper only shards fused layers
    return module.shard_view(param.data, target.shard_id)

