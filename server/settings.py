"""Server settings: the one pydantic model filled from defaults < YAML file < env < CLI flags."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from engine import InvalidRequestError, SpeculativeConfig

logger = logging.getLogger(__name__)

ENV_PREFIX = "PAGEDSERVE_"

# fields that hold several values: comma-separated in env vars, repeatable as flags
LIST_FIELDS = ("api_keys", "allowed_origins")
# names accepted in YAML files and env vars besides the field names themselves
ALIASES = {"api_key": "api_keys", "allowed_origin": "allowed_origins"}
# settings handed to EngineConfig.from_kwargs (everything else is the server's own)
ENGINE_FIELDS = (
    "dtype", "device", "max_model_len", "block_size", "kv_cache_memory_gb",
    "gpu_memory_utilization", "num_blocks", "enable_prefix_caching", "max_num_seqs",
    "max_num_batched_tokens", "prefill_tokens_while_decoding", "max_queue_len", "seed",
    "allow_pickle", "trust_remote_code",
    "quantization", "attention_backend", "enforce_eager", "prefix_caching_hash_algo",
    "speculative_config", "tensor_parallel_size", "pipeline_parallel_size",
    "enable_expert_parallel", "distributed_timeout_s",
)


class SettingsError(ValueError):
    """A config file, env var or flag holds a value the settings model rejects."""


class Settings(BaseModel):
    """Everything `pagedserve serve` can be told. Field descriptions double as --help text;
    engine defaults mirror engine.config's (a unit test keeps them in step)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str | None = Field(
        None, description="model directory, .gguf file or hub id; omitted: the embedded "
        "default model (Qwen2.5-Coder-0.5B-Instruct)")
    served_model_name: str | None = Field(
        None, description="name clients pass as `model` (default: the model's directory or "
        "file name)")
    chat_template: str | None = Field(
        None, description="a Jinja chat template (a file, or the template itself) used instead "
        "of the tokenizer's")
    trust_request_chat_template: bool = Field(
        False, description="let requests bring their own chat_template: a template is code, "
        "run in the same Jinja sandbox as the model's, which limits what it can reach but not "
        "how long it runs (off: such requests get 400)")
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = Field(
        None, description="the model's tool-call format, parsed into tool_calls when "
        "tool_choice is auto (default: recognised from the chat template)")
    reasoning_parser: Literal["qwen3", "deepseek_r1"] | None = Field(
        None, description="models that think in <think>...</think>: the thinking goes to "
        "reasoning_content (default: none, it stays in content)")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 exposes the server")
    port: int = Field(8000, ge=0, le=65535, description="TCP port to listen on")
    api_keys: tuple[str, ...] = Field(
        (), description="API key clients must send as `Authorization: Bearer KEY` "
        "(repeatable; none: no auth)")
    api_key_file: str | None = Field(None, description="file with one API key per line")
    allowed_origins: tuple[str, ...] = Field(
        (), description="CORS origins allowed to call the API (repeatable or comma-separated; "
        "none: CORS off)")
    ui: bool = Field(
        True, description="serve the browser chat playground at / (default: on; --no-ui: off, "
        "and / is 404). The page itself needs no API key: its API calls carry one")
    max_request_body_bytes: int = Field(
        16 * 1024 * 1024, ge=1, description="largest accepted request body; larger: 413")
    body_read_timeout: float = Field(
        30.0, gt=0, description="seconds a client has to send its whole request body; a "
        "slower (or shorter than its Content-Length) body gets 408 and the connection closes")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", description="logging level")
    log_format: Literal["text", "json"] = Field(
        "text", description="log line format: text, or one JSON object per line for log "
        "shippers")
    metrics_names: Literal["pagedserve", "vllm", "both"] = Field(
        "pagedserve", description="names /metrics exports: pagedserve_* (default), vllm:* "
        "(vLLM's names, labels, buckets and counting rules, for dashboards and alerts written "
        "for vLLM), or both (twice the exposition and the per-token metric work)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weight and activation dtype")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="device to run on")
    quantization: Literal["int8", "w8a8", "int4"] | None = Field(
        None, description="int8: int8 weights on CPU (AVX-512 VNNI kernels, decode "
        "activations quantized per 64 values, prefill in bf16 over the dequantized weight): "
        "half the weight bytes per token, so faster decode and less memory, at a small cost "
        "in fidelity; w8a8: int8 and int8 activations for prefill too (the int8 GEMM, faster "
        "prefill and batches, a little more fidelity lost); int4: group-wise 4-bit weights "
        "(128 per scale and zero), a quarter of bf16's weight bytes; GPTQ/AWQ checkpoints "
        "load as int4 without it (default: none, the dtype's weights)")
    attention_backend: Literal["auto", "torch", "triton"] | None = Field(
        None, description="attention kernels: auto (Triton on CUDA, the torch reference on "
        "CPU), torch, or triton (default: $PAGEDSERVE_ATTENTION_BACKEND, else auto)")
    enforce_eager: bool = Field(
        False, description="CUDA: run decode eagerly instead of replaying captured CUDA graphs")
    max_model_len: int | None = Field(
        None, ge=1, description="context length limit (default: the model's)")
    block_size: int = Field(16, description="tokens per KV cache block")
    kv_cache_memory_gb: float = Field(
        2.0, gt=0, description="KV cache budget in GiB on CPU")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="fraction of GPU memory for weights, activations and KV")
    num_blocks: int | None = Field(
        None, ge=1, description="explicit KV cache size in blocks; overrides the budgets")
    enable_prefix_caching: bool = Field(
        True, description="reuse KV blocks of shared prompt prefixes")
    prefix_caching_hash_algo: Literal["sha256", "xxhash"] = Field(
        "sha256", description="hash chaining prefix-cache blocks: sha256, or xxhash (faster, "
        "not cryptographic: only where every client is trusted; needs the xxhash package)")
    max_num_seqs: int = Field(64, ge=1, description="most sequences running in one step")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="most tokens processed in one step")
    prefill_tokens_while_decoding: int | None = Field(
        None, ge=1, description="while other requests decode, most prompt tokens per step "
        "(weighted by context: a long prompt's late chunks are smaller), so their streams "
        "keep a bounded gap between tokens; waiting requests get half of it (default: no "
        "cap beyond max_num_batched_tokens)")
    max_queue_len: int | None = Field(
        None, ge=0, description="most requests waiting; beyond it: 429 (default: unbounded)")
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**64, description="seed of the sampling of requests that "
        "bring no seed of their own: the same seed answers the same requests, sent in the "
        "same order, the same on every start (default: a fresh random seed each start)")
    speculative_config: dict[str, Any] | None = Field(
        None, description="speculative decoding, as a JSON object (a mapping in YAML), with "
        "vLLM's keys: {\"method\": \"ngram\", \"num_speculative_tokens\": 5, "
        "\"prompt_lookup_min\": 2, \"prompt_lookup_max\": 4} proposes tokens by prompt "
        "lookup; {\"model\": DIR, \"num_speculative_tokens\": 4} by a draft model with the "
        "same tokenizer. \"disable_by_batch_size\" (default 4) pauses it while more "
        "sequences run (default: off)")
    tensor_parallel_size: int = Field(
        1, ge=1, description="processes splitting every layer (torch.distributed: gloo on CPU, "
        "NCCL on GPUs); the engine spawns the other ranks, or joins a world torchrun started")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="pipeline stages splitting the layer stack (world size = tensor "
        "x pipeline parallel size)")
    enable_expert_parallel: bool = Field(
        False, description="MoE models: place whole experts on the tensor parallel ranks "
        "instead of splitting every expert")
    distributed_timeout_s: float = Field(
        60.0, gt=0, description="how long a parallel step waits for a rank before the group "
        "is declared broken (a hung worker)")
    strict_max_model_len: bool = Field(
        False, description="fail at startup when max_model_len does not fit the KV cache, "
        "instead of lowering it with a warning")
    allow_pickle: bool = Field(
        False, description="allow PyTorch pickle (.bin/.pt) weights; unpickling runs code, so "
        "only for checkpoints you trust (default: safetensors and GGUF only)")
    trust_remote_code: bool = Field(
        False, description="let transformers run Python code shipped with the checkpoint "
        "(default: never)")
    request_timeout: float | None = Field(
        None, gt=0, description="seconds a request may take from arrival to its last token; "
        "past it the request fails with 504 (an error event when streaming) and its KV blocks "
        "are freed (default: no limit)")
    shutdown_timeout: float = Field(
        30.0, ge=0, description="on SIGTERM/SIGINT, seconds running requests get to finish "
        "while new ones are refused with 503; the rest then fail")
    engine_stall_timeout: float = Field(
        30.0, gt=0, description="/health answers 503 once the engine loop has made no "
        "progress for this many seconds (a hung step)")

    @field_validator("speculative_config", mode="before")
    @classmethod
    def _speculative_config(cls, value: object) -> object:
        """A flag or env var brings JSON text; either way the engine checks the keys now, so a
        typo fails at startup, not at the first request."""
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("must be an object, e.g. {\"method\": \"ngram\"}")
        try:
            SpeculativeConfig.from_dict(value)
        except InvalidRequestError as exc:
            raise ValueError(str(exc)) from exc
        return value

    def engine_kwargs(self) -> dict[str, object]:
        """Engine arguments besides `model`: EngineConfig.from_kwargs(s.model, **these)."""
        return {name: getattr(self, name) for name in ENGINE_FIELDS}


def load_settings(
    flags: Mapping[str, object] | None = None,
    config_path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources, later ones winning: defaults, YAML file, env vars, CLI flags.
    `flags` holds only the flags the user gave (so an absent flag never hides the env)."""
    environ = os.environ if environ is None else environ
    config_path = config_path or environ.get(f"{ENV_PREFIX}CONFIG") or None
    merged: dict[str, object] = {}
    if config_path is not None:
        merged.update(read_yaml(Path(config_path)))
    merged.update(read_env(environ))
    merged.update(_normalize_flags(dict(flags or {})))
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from exc


def read_yaml(path: Path) -> dict[str, object]:
    """Settings from a YAML mapping; keys in snake_case or kebab-case."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a mapping of settings")
    values = {_field_name(str(key)): value for key, value in data.items()}
    for name in LIST_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = _split(str(values[name]))
    return values


def read_env(environ: Mapping[str, str]) -> dict[str, object]:
    """Settings from PAGEDSERVE_* variables; an empty value counts as unset."""
    values: dict[str, object] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key == f"{ENV_PREFIX}CONFIG" or raw == "":
            continue
        name = _field_name(key[len(ENV_PREFIX):].lower())
        if name not in Settings.model_fields:
            logger.debug("ignoring env var %s: not a pagedserve setting", key)
            continue
        values[name] = _split(raw) if name in LIST_FIELDS else raw
    return values


def resolve_api_keys(settings: Settings) -> tuple[str, ...]:
    """The configured keys plus those in api_key_file (blank lines and # comments skipped)."""
    keys = list(settings.api_keys)
    if settings.api_key_file:
        try:
            lines = Path(settings.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise SettingsError(f"cannot read api_key_file: {exc}") from exc
        keys += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    return tuple(key for key in keys if key)


def _field_name(key: str) -> str:
    name = key.strip().replace("-", "_").lower()
    return ALIASES.get(name, name)


def _split(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


def _normalize_flags(flags: dict[str, object]) -> dict[str, object]:
    # --allowed-origins a,b and --allowed-origins a --allowed-origins b mean the same; a
    # repeatable flag replaces, not extends, what lower-precedence sources gave
    origins = flags.get("allowed_origins")
    if isinstance(origins, list):
        flags["allowed_origins"] = [item for raw in origins for item in _split(str(raw))]
    return flags


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "settings"
        shown = "<hidden>" if where.startswith("api_key") else repr(error.get("input"))
        problems.append(f"{where}: {error['msg']} (got {shown})")
    return "invalid settings: " + "; ".join(problems)
