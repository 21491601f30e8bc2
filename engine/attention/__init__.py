"""Attention backends behind one interface; `get_attention_backend` picks one per device."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention.torch_ref import TorchAttentionBackend, write_kv

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttentionBackend",
           "get_attention_backend", "write_kv"]


def get_attention_backend(device: torch.device) -> AttentionBackend:
    """The backend for `device`. Only the torch reference exists so far; it runs on CUDA too,
    so a CUDA backend can replace it here without touching callers."""
    del device  # every device gets the reference backend for now
    return TorchAttentionBackend()
