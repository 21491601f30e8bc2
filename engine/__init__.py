"""pagedserve's engine: paged-KV continuous batching over our own decoder implementations.

Exports resolve lazily, so `import engine.scheduler` (pure Python) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "GENERATION_DEFAULT_FIELDS": "engine.sampling_params",
    "AsyncEngine": "engine.async_engine",
    "CacheConfig": "engine.config",
    "EngineConfig": "engine.config",
    "EngineSummary": "engine.summary",
    "ModelConfig": "engine.config",
    "SchedulerConfig": "engine.config",
    "SpeculativeConfig": "engine.config",
    "ParallelConfig": "engine.config",
    "SamplingParams": "engine.sampling_params",
    "StructuredOutputsParams": "engine.structured.params",
    "JSON_FORMAT": "engine.structured.params",
    "CompletionOutput": "engine.outputs",
    "Logprob": "engine.outputs",
    "RequestOutput": "engine.outputs",
    "RequestOutputKind": "engine.outputs",
    "RequestTiming": "engine.outputs",
    "ContextLengthExceededError": "engine.errors",
    "EngineDeadError": "engine.errors",
    "EngineDiedError": "engine.errors",
    "EngineError": "engine.errors",
    "InvalidRequestError": "engine.errors",
    "QueueFullError": "engine.errors",
    "RequestFailedError": "engine.errors",
    "RequestTimeoutError": "engine.errors",
    "UnsupportedModelError": "engine.errors",
    "torchrun_rank": "engine.distributed.group",
    "serve_worker_rank": "engine.distributed.worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:
    from engine.async_engine import AsyncEngine
    from engine.config import (
        CacheConfig,
        EngineConfig,
        ModelConfig,
        ParallelConfig,
        SchedulerConfig,
        SpeculativeConfig,
    )
    from engine.distributed.group import torchrun_rank
    from engine.distributed.worker import serve_worker_rank
    from engine.errors import (
        ContextLengthExceededError,
        EngineDeadError,
        EngineDiedError,
        EngineError,
        InvalidRequestError,
        QueueFullError,
        RequestFailedError,
        RequestTimeoutError,
        UnsupportedModelError,
    )
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.outputs import (
        CompletionOutput,
        Logprob,
        RequestOutput,
        RequestOutputKind,
        RequestTiming,
    )
    from engine.sampling_params import GENERATION_DEFAULT_FIELDS, SamplingParams
    from engine.structured.params import JSON_FORMAT, StructuredOutputsParams
    from engine.summary import EngineSummary
