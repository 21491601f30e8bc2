"""The contract every decoder implements for the model runner, and shared weight loading."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.distributed.parallel import SINGLE, Parallel
from engine.errors import UnsupportedModelError
from engine.layers.linear import Linear, prepack_linears, quantize_linears, tensor_regions
from engine.layers.parallel import VocabParallelEmbedding

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
    `map_weight_name`, `output_embedding` and `kv_cache_spec`.

    Under tensor/pipeline parallelism (`parallel`) a model holds this rank's slices of the
    layers of its pipeline stage only; the embedding, the final norm and the LM head live on
    the first stage. `forward` returns the final hidden states on the first stage (whatever
    it likes elsewhere), and `compute_logits` the full vocabulary on every TP rank."""

    # whether decode steps can be captured in CUDA graphs: not where a step's work depends on
    # values read back to the host (MoE grouping by expert)
    graph_capturable = True
    # whether GPTQ/AWQ checkpoints load: their per-projection int4 tensors map onto our Linears
    loads_int4_checkpoints = True
    # the checkpoint's name of the decoder layer list ("model.layers.<i>."; GPT-2: "h.<i>.")
    layer_list_name = "layers"

    def __init__(self, hf_config: transformers.PretrainedConfig,
                 attn_backend: AttentionBackend, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.hf_config = hf_config
        self.attn_backend = attn_backend
        self.parallel = parallel
        self.stage_layers = parallel.stage_layers(hf_config.num_hidden_layers)
        # packed, int8 or int4 copy of a tied LM head (CPU)
        self.tied_output_head: Linear | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: KVCaches,
                metadata: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def kv_cache_spec(cls, hf_config: transformers.PretrainedConfig,
                      parallel: Parallel = SINGLE) -> KVCacheSpec:
        """This rank's KV cache: its stage's layers, its KV heads."""
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
        """[n, hidden_size] -> [n, vocab_size] float32; the matmul runs in the model dtype.
        Under TP each rank computes its vocabulary rows and they are gathered (first stage)."""
        head = self.output_head() or self.tied_output_head
        if head is not None and self.parallel.tp_size == 1:
            return head.float_forward(hidden_states)
        if head is not None:
            logits = head(hidden_states)
        else:
            logits = F.linear(hidden_states, self.output_embedding())
        if self.parallel.tp_size > 1:  # the last rank's padding rows cut off
            gathered = self.parallel.all_gather(logits)
            logits = gathered[:, :self.hf_config.vocab_size].contiguous()
        return logits.float()

    def matmul_weight_regions(self) -> list[tuple[int, int]]:
        """(address, bytes) of what the matmuls read: every Linear's weight and bias (the LM
        head's packed or quantized copy included), and the embedding table where the LM head
        multiplies by the table itself (tied, with no copy)."""
        regions = [region for module in self.modules() if isinstance(module, Linear)
                   for region in module.weight_regions()]
        if self.needs_tied_head_copy():
            regions += tensor_regions([self.output_embedding()])
        return regions

    def prepack_weights(self) -> int:
        """Move every matmul weight not already int8 into oneDNN's prepacked layout (CPU bf16
        inference). A tied LM head gets a packed copy: the embedding lookup still needs the
        dense table. Returns how many weights were packed."""
        if self.needs_tied_head_copy():
            self.tied_output_head = Linear.packed_from(self.output_embedding())
        self.split_stacked_weights()
        return prepack_linears(self)

    def quantize_weights(self, bits: int, int8_prefill: bool = False,
                         head_and_embedding: bool = True) -> tuple[int, int]:
        """Quantize every matmul weight whose in_features the format allows (CPU): int8
        (engine/kernels/w8a8.py; `int8_prefill`: int8 activations for prefill too) or
        group-wise int4 (w4a16.py); MoE experts through their split, a tied LM head as a
        quantized copy; then the token embedding (int8 rows). Without `head_and_embedding`
        the LM head and the token embedding stay in the model dtype (a tied head then gets
        its packed copy from `prepack_weights`). Returns (quantized, left in the model dtype
        for their in_features) of the matmuls."""
        if head_and_embedding and self.needs_tied_head_copy():
            embedding = self.output_embedding()
            self.tied_output_head = (Linear.int8_from(embedding, int8_prefill) if bits == 8
                                     else Linear.int4_from(embedding))
        self.split_stacked_weights()
        counts = quantize_linears(self, bits, int8_prefill,
                                  skip=None if head_and_embedding else self.output_head())
        if head_and_embedding:
            self.quantize_embeddings()
        return counts

    def quantize_embeddings(self) -> int:
        """Token embedding tables to int8 rows (`VocabParallelEmbedding.quantize_int8`), for a
        model whose matmuls are quantized (by flag or by its checkpoint); not while a tied LM
        head multiplies by the table itself (it has no copy). Returns how many were."""
        if self.needs_tied_head_copy():
            return 0
        return sum(module.quantize_int8() for module in self.modules()
                   if isinstance(module, VocabParallelEmbedding))

    def needs_tied_head_copy(self) -> bool:
        """Whether the LM head is the embedding and has no packed/quantized copy yet (only
        the first pipeline stage holds either)."""
        return (self.parallel.is_first_stage and self.output_head() is None
                and self.tied_output_head is None)

    def split_stacked_weights(self) -> None:
        """Give weights stored as stacks (MoE experts) one Linear per matmul, so prepacking
        and int8 reach them like any layer; a no-op for dense models."""

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     on_module_loaded: Callable[[str], None] | None = None) -> None:
        """Copy checkpoint tensors (HF names) into the parameters, converting dtype and device
        per tensor; every parameter (every shard of a fused one) must be written once.
        `on_module_loaded(name)` runs as soon as all of a module's own parameters are written
        (the loader quantizes a layer there, so the float model never exists whole)."""
        load_named_weights(self, weights, self.map_checkpoint_name, on_module_loaded)

    def map_checkpoint_name(self, name: str) -> WeightTarget | None:
        """`map_weight_name` of this pipeline stage: tensors of other stages' layers (and,
        off the first stage, of the embedding, final norm and head) skipped, the stage's
        layers renumbered from 0."""
        if self.parallel.pp_size > 1:
            local_name = self._stage_local_name(name)
            if local_name is None:
                return None
            name = local_name
        return self.map_weight_name(name)

    def _stage_local_name(self, name: str) -> str | None:
        found = re.search(rf"(?:^|\.){re.escape(self.layer_list_name)}\.(\d+)\.", name)
        if found is None:  # outside the layers: the first stage's
            return name if self.parallel.is_first_stage else None
        index = int(found.group(1))
        if index not in self.stage_layers:
            return None
        return f"{name[:found.start(1)]}{index - self.stage_layers.start}{name[found.end(1):]}"


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       map_name: NameMapper,
                       on_module_loaded: Callable[[str], None] | None = None) -> None:
    params = dict(model.named_parameters())
    expected = _expected_targets(model)
    by_module: dict[str, set[tuple[str, str | None]]] = {}
    for param_name, shard_id in expected:
        by_module.setdefault(param_name.rpartition(".")[0], set()).add((param_name, shard_id))
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
            tensor = _local_part(model, target, tensor)
            if tensor.shape != destination.shape:
                raise UnsupportedModelError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(destination.shape)}: config.json does not match the weights")
            destination.copy_(tensor)
            del tensor, destination  # not alive while the next tensor is read
            if target.shard_id is None:  # the whole tensor: every shard of a fused one
                loaded.update((target.param_name, shard_id)
                              for shard_id in _shard_ids(model, target.param_name))
            else:
                loaded.add((target.param_name, target.shard_id))
            module_name = target.param_name.rpartition(".")[0]
            if (on_module_loaded is not None and module_name in by_module
                    and by_module[module_name] <= loaded):
                on_module_loaded(module_name)
                # reported once; what the callback replaced is not kept alive from here
                for param_name, _ in by_module.pop(module_name):
                    params.pop(param_name, None)
    missing = sorted(f"{p}[{s}]" if s else p for p, s in expected - loaded)
    if missing:
        raise UnsupportedModelError(
            f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")


class ShardedParameters(Protocol):
    """A module whose parameters checkpoints store in parts (fused q/k/v, stacked experts):
    the loader writes each part through `shard_view` and checks every part was written."""

    def shard_ids(self, param_name: str) -> list[str]: ...

    def shard_view(self, param: torch.Tensor, shard_id: str) -> torch.Tensor: ...


def _sharded_module(model: nn.Module, param_name: str) -> ShardedParameters | None:
    module = model.get_submodule(param_name.rpartition(".")[0])
    return module if hasattr(module, "shard_view") else None  # type: ignore[return-value]


def _shard_ids(model: nn.Module, param_name: str) -> list[str | None]:
    module = _sharded_module(model, param_name)
    if module is None:
        return [None]
    return list(module.shard_ids(param_name.rpartition(".")[2]))


def _expected_targets(model: nn.Module) -> set[tuple[str, str | None]]:
    return {(name, shard_id) for name, _ in model.named_parameters()
            for shard_id in _shard_ids(model, name)}


def _local_part(model: nn.Module, target: WeightTarget, tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a full checkpoint tensor, as its module's `local_part` cuts it
    (tensor-parallel layers); the whole tensor for every other module."""
    module_name, _, leaf = target.param_name.rpartition(".")
    local_part = getattr(model.get_submodule(module_name), "local_part", None)
    return tensor if local_part is None else local_part(leaf, target.shard_id, tensor)


def _destination(model: nn.Module, target: WeightTarget, param: torch.Tensor) -> torch.Tensor:
    if target.shard_id is None:
        return param.data
    module = _sharded_module(model, target.param_name)
    assert module is not None, target  # the name mapper only shards fused layers
    return module.shard_view(param.data, target.shard_id)

