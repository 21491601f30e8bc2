"""Attention backends behind one interface; `get_attention_backend` picks one per device."""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.torch_ref import TorchAttentionBackend, write_kv
from engine.config import ATTENTION_BACKENDS
from engine.errors import InvalidRequestError

__all__ = ["ATTENTION_BACKENDS", "ATTENTION_BACKEND_ENV", "AttentionBackend",
           "AttentionMetadata", "TorchAttentionBackend", "get_attention_backend",
           "triton_available", "write_kv"]

logger = logging.getLogger(__name__)

ATTENTION_BACKEND_ENV = "PAGEDSERVE_ATTENTION_BACKEND"


def get_attention_backend(device: torch.device, backend: str | None = None) -> AttentionBackend:
    """The backend for `device`. `backend` (else $PAGEDSERVE_ATTENTION_BACKEND, else "auto")
    is one of ATTENTION_BACKENDS."""
    name = backend or os.environ.get(ATTENTION_BACKEND_ENV) or "auto"
    if name not in ATTENTION_BACKENDS:
        raise InvalidRequestError(f"attention backend must be one of {ATTENTION_BACKENDS}, "
                                  f"got {name!r}", param="attention_backend")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    if not triton_available():
        if name == "triton":
            raise InvalidRequestError("attention backend 'triton' requested but Triton is not "
                                      "installed", param="attention_backend")
        logger.warning("Triton is not installed: CUDA attention uses the torch SDPA reference")
        return TorchAttentionBackend()
    # imported here: importing triton_kernels fixes interpreter vs compiled mode for good,
    # and CPU-only processes should not pay for importing Triton at all
    from engine.attention.cuda import CudaAttentionBackend

    return CudaAttentionBackend()


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
