"""Mixture-of-Experts decoders: Mixtral, Qwen2-MoE (with its gated shared expert), Qwen3-MoE.

They are the Llama-style decoder with the MLP of some layers replaced by a sparse block: a
router scores every expert per token, the top k experts run, and their outputs are summed
with the router's weights. The experts' weights are stacked ([num_experts, ...] tensors), and
tokens are grouped by expert, so each active expert runs one matmul pair over all its rows
per step: the work is a loop over at most num_experts experts, never over tokens.

Tensor parallelism splits every expert like a dense MLP (gate/up rows, down columns of the
MoE intermediate size); expert parallelism gives each TP rank whole experts instead, every
rank routing all tokens alike and running only its own. Either way each rank's block output
is a partial sum, and the block all-reduces once (experts and shared expert together)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
import transformers
from torch import nn

from engine.distributed.parallel import SINGLE, Parallel
from engine.errors import UnsupportedModelError
from engine.layers.activation import SiluAndMul
from engine.layers.linear import Linear
from engine.layers.parallel import take_rows
from engine.models.base import WeightTarget
from engine.models.llama import DecoderOptions, LlamaForCausalLM, LlamaMLP

# checkpoint expert projection names -> our shard of the stacked weights, per family
_MIXTRAL_EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down"}
_QWEN_EXPERT_PARTS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclass(frozen=True, slots=True)
class RouterOptions:
    """How a family turns router logits into expert weights."""

    num_experts: int
    top_k: int
    normalize: bool  # renormalize the top-k probabilities to sum to 1 (norm_topk_prob)
    # Qwen casts the weights to the model dtype before scaling the experts' outputs;
    # Mixtral keeps them float32 (the product is rounded once, when it is summed)
    weights_in_model_dtype: bool


class StackedExperts(nn.Module):
    """Every expert's SwiGLU MLP, stacked: gate_up_proj [E, 2 * I, H] (gate rows then up
    rows, as one fused matmul per expert) and down_proj [E, H, I].

    Checkpoints store one tensor per expert and projection; the loader writes each through
    `shard_view` with shard ids "<expert>.gate", "<expert>.up" and "<expert>.down" (the
    expert's index among this rank's). A checkpoint that already stores the stacks
    (transformers' fused layout) loads whole.

    A rank holds experts [first_expert, first_expert + num_experts) of `total_experts` (all of
    them but under expert parallelism), each with intermediate rows
    [intermediate_start, + intermediate_size) of `full_intermediate` (all of them but under
    plain tensor parallelism)."""

    def __init__(self, total_experts: int, hidden_size: int, full_intermediate: int,
                 parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.total_experts, self.full_intermediate = total_experts, full_intermediate
        if parallel.expert_parallel:
            self.first_expert, self.num_experts = parallel.split(total_experts,
                                                                 "number of experts")
            self.intermediate_start, self.intermediate_size = 0, full_intermediate
        else:
            self.first_expert, self.num_experts = 0, total_experts
            self.intermediate_start, self.intermediate_size = parallel.split(
                full_intermediate, "MoE intermediate size")
        num_experts, intermediate_size = self.num_experts, self.intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.down_proj = nn.Parameter(
            torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)
        self.act = SiluAndMul()
        # (gate_up, down) Linear pairs per expert once split (prepacked or int8 forms)
        self.expert_layers: nn.ModuleList | None = None

    def split(self) -> None:
        """Trade the stacks for one Linear pair per expert, for the paths that replace each
        layer's dense weight (oneDNN prepacking, int8). Each layer starts as a view into the
        stack, so nothing is copied until packing or quantizing replaces it."""
        if self.expert_layers is not None:
            return
        self.expert_layers = nn.ModuleList(
            nn.ModuleList([Linear.over(self.gate_up_proj[expert]),
                           Linear.over(self.down_proj[expert])])
            for expert in range(self.num_experts))
        empty = self.gate_up_proj.new_empty(0)
        self.gate_up_proj = nn.Parameter(empty, requires_grad=False)
        self.down_proj = nn.Parameter(empty.clone(), requires_grad=False)

    def shard_ids(self, param_name: str) -> list[str]:
        parts = ("down",) if param_name == "down_proj" else ("gate", "up")
        return [f"{expert}.{part}" for expert in range(self.num_experts) for part in parts]

    def shard_view(self, param: torch.Tensor, shard_id: str) -> torch.Tensor:
        expert, _, part = shard_id.partition(".")
        rows = param[int(expert)]
        if part == "down":
            return rows
        offset = 0 if part == "gate" else self.intermediate_size
        return rows.narrow(0, offset, self.intermediate_size)

    def local_part(self, param_leaf: str, shard_id: str | None,
                   tensor: torch.Tensor) -> torch.Tensor:
        """This rank's intermediate rows (gate, up) or columns (down) of one expert's
        projection, or of a whole stack also its experts."""
        is_down = param_leaf == "down_proj"
        if shard_id is None:  # a fused stack [total_experts, ...]
            if tensor.dim() != 3 or tensor.shape[0] != self.total_experts:
                return tensor
            tensor = tensor.narrow(0, self.first_expert, self.num_experts)
            if is_down:
                return self._intermediate_part(tensor, dim=2)
            gate_up = tensor.unflatten(1, (2, -1))  # [experts, 2, full_intermediate, hidden]
            return self._intermediate_part(gate_up, dim=2).flatten(1, 2)
        return self._intermediate_part(tensor, dim=1 if is_down else 0)

    def _intermediate_part(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        if tensor.shape[dim] != self.full_intermediate:
            return tensor  # a mismatch the loader's shape check names
        return take_rows(tensor, self.intermediate_start, self.intermediate_size, dim)

    def forward(self, hidden_states: torch.Tensor, expert_ids: torch.Tensor,
                expert_weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's experts of weight * expert(token): hidden_states [T, H],
        expert_ids (global) and expert_weights [T, k]. Only this rank's experts run."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)
        # (token, slot) pairs in expert order: each expert's rows are one contiguous run
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=self.total_experts).tolist()
        flat_weights = expert_weights.reshape(-1)
        out = torch.zeros_like(hidden_states)
        start = sum(counts[:self.first_expert])  # the rows of other ranks' experts before ours
        local_counts = counts[self.first_expert:self.first_expert + self.num_experts]
        for expert, count in enumerate(local_counts):
            if count == 0:
                continue
            pairs = order[start:start + count]
            start += count
            tokens = pairs // top_k
            expert_out = self.run_expert(expert, hidden_states.index_select(0, tokens))
            weighted = expert_out * flat_weights.index_select(0, pairs).unsqueeze(1)
            out.index_add_(0, tokens, weighted.to(out.dtype))
        return out

    def run_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's MLP over all the rows routed to it this step."""
        if self.expert_layers is not None:
            gate_up, down = cast(nn.ModuleList, self.expert_layers[expert])
            return down(self.act(gate_up(x)))
        return F.linear(self.act(F.linear(x, self.gate_up_proj[expert])), self.down_proj[expert])


class SparseMoeBlock(nn.Module):
    """Router + stacked experts, and Qwen2-MoE's shared expert (a dense MLP every token goes
    through, scaled by a sigmoid gate) where the family has one."""

    def __init__(self, hidden_size: int, intermediate_size: int, router: RouterOptions,
                 shared_expert: nn.Module | None = None, parallel: Parallel = SINGLE) -> None:
        super().__init__()
        self.router = router
        self.parallel = parallel
        self.gate = Linear(hidden_size, router.num_experts, bias=False)  # replicated
        self.experts = StackedExperts(router.num_experts, hidden_size, intermediate_size,
                                      parallel)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (None if shared_expert is None
                                   else Linear(hidden_size, 1, bias=False))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        expert_ids, expert_weights = self.route(hidden_states)
        out = self.experts(hidden_states, expert_ids, expert_weights)
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            gate = torch.sigmoid(self.shared_expert_gate(hidden_states))
            out = out + gate * self.shared_expert(hidden_states)
        # one reduce for the experts' and the shared expert's partial sums (no-op: one rank)
        return self.parallel.all_reduce(out)

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts and their weights: softmax over all experts in float32,
        top k, optionally renormalized."""
        logits = self.gate(hidden_states)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.router.top_k, dim=-1)
        if self.router.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.router.weights_in_model_dtype:
            weights = weights.to(logits.dtype)
        return expert_ids, weights


class _MoeForCausalLM(LlamaForCausalLM):
    """The Llama-style decoder whose sparse layers' MLP is a SparseMoeBlock; families say
    which layers are sparse, how the router weighs experts and how checkpoints name them."""

    expert_parts: dict[str, str] = _QWEN_EXPERT_PARTS
    moe_module_name = "mlp"  # the checkpoint's name for a layer's sparse block
    graph_capturable = False  # StackedExperts reads each expert's row count on the host
    loads_int4_checkpoints = False  # the experts are stacks, not Linears, while loading

    def split_stacked_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, StackedExperts):
                module.split()

    @staticmethod
    def num_experts_of(hf_config: transformers.PretrainedConfig) -> int:
        return int(getattr(hf_config, "num_experts", 0) or 0)

    def map_weight_name(self, name: str) -> WeightTarget | None:
        module_path, _, param = name.rpartition(".")
        parts = module_path.split(".")
        # model.layers.<i>.<moe>.experts.<e>.<proj>.weight: one expert's projection
        if len(parts) == 7 and parts[3] == self.moe_module_name and parts[4] == "experts":
            part = self.expert_parts.get(parts[6])
            if part is None or param != "weight" or not parts[5].isdigit():
                raise UnsupportedModelError(f"unexpected tensor {name!r} in the checkpoint")
            expert = self._local_expert(int(parts[5]))
            if expert is None:
                return None  # another rank's expert (expert parallelism)
            stack = "down_proj" if part == "down" else "gate_up_proj"
            return WeightTarget(f"model.layers.{parts[2]}.mlp.experts.{stack}",
                                f"{expert}.{part}")
        if len(parts) >= 4 and parts[3] == self.moe_module_name != "mlp":
            name = ".".join([*parts[:3], "mlp", *parts[4:], param])
        return super().map_weight_name(name)


    def _local_expert(self, expert: int) -> int | None:
        """The index of checkpoint expert `expert` among this rank's, None if not its."""
        if not self.parallel.expert_parallel:
            return expert
        first, count = self.parallel.split(self.num_experts_of(self.hf_config),
                                           "number of experts")
        return expert - first if first <= expert < first + count else None


def _check_experts(num_experts: int, top_k: int) -> None:
    if not 0 < top_k <= num_experts:
        raise UnsupportedModelError(
            f"num_experts_per_tok={top_k} must be between 1 and the {num_experts} experts")


class MixtralForCausalLM(_MoeForCausalLM):
    """Mixtral: every layer sparse, top-k weights renormalized, experts named w1/w3/w2
    under block_sparse_moe."""

    expert_parts = _MIXTRAL_EXPERT_PARTS
    moe_module_name = "block_sparse_moe"

    @staticmethod
    def num_experts_of(hf_config: transformers.PretrainedConfig) -> int:
        return int(hf_config.num_local_experts)

    @classmethod
    def decoder_options(cls, hf_config: transformers.PretrainedConfig) -> DecoderOptions:
        return DecoderOptions()

    @staticmethod
    def build_mlp(hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                  layer_index: int, parallel: Parallel) -> nn.Module:
        num_experts, top_k = hf_config.num_local_experts, hf_config.num_experts_per_tok
        _check_experts(num_experts, top_k)
        router = RouterOptions(num_experts, top_k, normalize=True,
                               weights_in_model_dtype=False)
        return SparseMoeBlock(hf_config.hidden_size, hf_config.intermediate_size, router,
                              parallel=parallel)


def is_sparse_layer(hf_config: transformers.PretrainedConfig, layer_index: int) -> bool:
    """Qwen-MoE's rule: sparse unless listed in mlp_only_layers, every decoder_sparse_step-th
    layer (counting from 1)."""
    mlp_only: Sequence[int] = getattr(hf_config, "mlp_only_layers", None) or ()
    step = int(getattr(hf_config, "decoder_sparse_step", 1) or 1)
    return (layer_index not in mlp_only and hf_config.num_experts > 0
            and (layer_index + 1) % step == 0)


def _qwen_moe_mlp(hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                  layer_index: int, parallel: Parallel, shared_expert: bool) -> nn.Module:
    if not is_sparse_layer(hf_config, layer_index):
        return LlamaMLP(hf_config, options, parallel=parallel)
    num_experts, top_k = hf_config.num_experts, hf_config.num_experts_per_tok
    _check_experts(num_experts, top_k)
    router = RouterOptions(num_experts, top_k,
                           normalize=bool(getattr(hf_config, "norm_topk_prob", False)),
                           weights_in_model_dtype=True)
    shared = None
    if shared_expert and getattr(hf_config, "shared_expert_intermediate_size", None):
        # its partial sum is reduced with the experts' (SparseMoeBlock.forward)
        shared = LlamaMLP(hf_config, options, hf_config.shared_expert_intermediate_size,
                          parallel, reduce_output=False)
    return SparseMoeBlock(hf_config.hidden_size, hf_config.moe_intermediate_size, router,
                          shared, parallel)


class Qwen2MoeForCausalLM(_MoeForCausalLM):
    """Qwen2-MoE: Qwen2's attention (q/k/v bias), sparse layers with a gated shared expert."""

    @classmethod
    def decoder_options(cls, hf_config: transformers.PretrainedConfig) -> DecoderOptions:
        return DecoderOptions(qkv_bias=bool(getattr(hf_config, "qkv_bias", True)))

    @staticmethod
    def build_mlp(hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                  layer_index: int, parallel: Parallel) -> nn.Module:
        return _qwen_moe_mlp(hf_config, options, layer_index, parallel, shared_expert=True)


class Qwen3MoeForCausalLM(_MoeForCausalLM):
    """Qwen3-MoE: Qwen3's attention (q/k norms), sparse layers without a shared expert."""

    @classmethod
    def decoder_options(cls, hf_config: transformers.PretrainedConfig) -> DecoderOptions:
        bias = bool(getattr(hf_config, "attention_bias", False))
        return DecoderOptions(qkv_bias=bias, o_proj_bias=bias, qk_norm=True)

    @staticmethod
    def build_mlp(hf_config: transformers.PretrainedConfig, options: DecoderOptions,
                  layer_index: int, parallel: Parallel) -> nn.Module:
        return _qwen_moe_mlp(hf_config, options, layer_index, parallel, shared_expert=False)
