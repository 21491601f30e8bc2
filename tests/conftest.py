"""Shared fixtures: tiny checkpoints built once per session, thread settings for 2-core machines."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.devices import DEVICE_ENV
from tests.tiny_models import ARCHITECTURES, save_tiny_model

torch.set_num_threads(2)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", choices=("cpu", "cuda"), default=None,
                     help=f"device for the engine tests (default: ${DEVICE_ENV}, else cpu)")


def pytest_configure(config: pytest.Config) -> None:
    # before any test module is imported: tests.devices reads the variable at import
    device = config.getoption("--device")
    if device is not None:
        os.environ[DEVICE_ENV] = device
    if os.environ.get(DEVICE_ENV, "cpu") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: CUDA is not available here")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny checkpoint per supported architecture, keyed by short name."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded default model's converted directory; skipped where it is not installed,
    except in CI, which installs it."""
    from engine.default_model import ensure_default_model
    from engine.errors import UnsupportedModelError

    try:
        return ensure_default_model()
    except UnsupportedModelError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"default model not installed: {error}")
