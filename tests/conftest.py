"""Shared fixtures: tiny checkpoints built once per session, thread settings for 2-core machines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_models import ARCHITECTURES, save_tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint per supported architecture, keyed by short name."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]
