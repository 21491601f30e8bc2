"""Import rules of DESIGN.md, enforced: the scheduler and kv_cache import without torch or numpy,
nothing under engine/ imports the server side (fastapi, pydantic, server), and the server
imports only the public `engine` package, never an `engine.<submodule>`."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "engine"
SERVER = ROOT / "server"

DEVICE_PACKAGES = frozenset({"torch", "numpy"})
SERVER_PACKAGES = frozenset({"fastapi", "pydantic", "server", "starlette", "uvicorn",
                             "sse_starlette"})
KV_CACHE_MODULES = ("engine.kv_cache", "engine.kv_cache.hashing", "engine.kv_cache.block_pool",
                    "engine.kv_cache.manager")

# Runs in a fresh interpreter: a meta-path finder that fails (and records) every attempt to
# import a blocked package, so even an `except ImportError` fallback counts as a violation.
_BLOCKED_IMPORT_SCRIPT = """
import importlib, importlib.abc, sys
BLOCKED = set(sys.argv[1].split(","))
attempts = []
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in BLOCKED:
            attempts.append(fullname)
            raise ImportError(f"blocked by the layering test: {fullname}")
        return None
sys.meta_path.insert(0, Blocker())
for name in sys.argv[2:]:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
if attempts or leaked:
    sys.exit(f"tried to import {sorted(set(attempts))}; loaded {leaked}")
"""


def import_without(blocked: frozenset[str],
                   modules: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORT_SCRIPT, ",".join(sorted(blocked)), *modules],
        cwd=ROOT, capture_output=True, text=True, timeout=60)


def imported_packages(source: str) -> set[str]:
    """Top-level names of every absolute import in the source, function-level ones too."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def engine_internal_imports(source: str) -> set[str]:
    """Every `engine.<submodule>` the source imports, function-level ones too; `from engine
    import name` counts when `name` is a submodule rather than a public export."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names
                         if alias.name.startswith("engine."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("engine."):
                names.add(node.module)
            elif node.module == "engine":
                names.update(f"engine.{alias.name}" for alias in node.names
                             if _is_engine_submodule(alias.name))
    return names


def _is_engine_submodule(name: str) -> bool:
    return (ENGINE / f"{name}.py").is_file() or (ENGINE / name / "__init__.py").is_file()


def test_blocked_import_harness_catches_torch() -> None:
    # the harness itself must be able to fail: tests.tiny_models imports torch
    result = import_without(DEVICE_PACKAGES, ("tests.tiny_models",))
    assert result.returncode != 0 and "torch" in result.stderr


def test_kv_cache_imports_without_torch_or_numpy() -> None:
    result = import_without(DEVICE_PACKAGES, (*KV_CACHE_MODULES, "engine.sequence"))
    assert result.returncode == 0, result.stderr


def test_scheduler_imports_without_torch_or_numpy() -> None:
    # engine/scheduler.py is written separately; once the file exists this test must run
    if not (ENGINE / "scheduler.py").exists():
        pytest.skip("engine/scheduler.py does not exist yet")
    result = import_without(DEVICE_PACKAGES, ("engine.scheduler",))
    assert result.returncode == 0, result.stderr


def test_pure_python_modules_have_no_lazy_device_imports() -> None:
    # the subprocess test only sees module-level imports; this one also sees imports
    # hidden inside functions, which would pull torch in at run time
    paths = sorted((ENGINE / "kv_cache").glob("*.py"))
    if (ENGINE / "scheduler.py").exists():
        paths.append(ENGINE / "scheduler.py")
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p.read_text())
                                                  & DEVICE_PACKAGES) for p in paths}
    assert len(paths) >= 4
    assert {path: names for path, names in offenders.items() if names} == {}


def test_the_seams_plain_data_and_the_text_side_import_no_device_code() -> None:
    """What crosses the seam (outputs, sampling params, fault hooks) and the output processor
    on the text side of it never pull in torch or the tensor-touching modules."""
    modules = ("engine.outputs", "engine.sampling_params", "engine.fault_hooks",
               "engine.structured.params", "engine.output_processor")
    for module in modules:
        source = (ENGINE / f"{module.removeprefix('engine.').replace('.', '/')}.py").read_text()
        assert not imported_packages(source) & DEVICE_PACKAGES, module
        assert not engine_internal_imports(source) & {
            "engine.core", "engine.model_runner", "engine.sampler", "engine.llm_engine"}, module
    result = import_without(DEVICE_PACKAGES | {"llguidance"}, modules[:4])
    assert result.returncode == 0, result.stderr


def test_engine_never_imports_the_server_side() -> None:
    paths = sorted(ENGINE.rglob("*.py"))
    offenders = {str(p.relative_to(ROOT)): sorted(imported_packages(p.read_text())
                                                  & SERVER_PACKAGES) for p in paths}
    assert paths
    assert {path: names for path, names in offenders.items() if names} == {}


def test_server_imports_only_the_public_engine_package() -> None:
    paths = sorted(SERVER.rglob("*.py"))
    offenders = {str(p.relative_to(ROOT)): engine_internal_imports(p.read_text())
                 for p in paths}
    assert paths
    assert {path: sorted(names) for path, names in offenders.items() if names} == {}


def test_engine_import_scanner_sees_every_internal_import_form() -> None:
    source = (
        "import engine\n"
        "import engine.config\n"
        "from engine import LLM, SamplingParams, errors\n"
        "from engine.outputs import RequestOutput\n"
        "from .engine import sibling\n"
        "def lazy():\n"
        "    from engine.kv_cache.manager import KVCacheManager\n"
    )
    assert engine_internal_imports(source) == {"engine.config", "engine.errors",
                                               "engine.outputs", "engine.kv_cache.manager"}


def test_import_scanner_sees_every_import_form() -> None:
    source = (
        "import fastapi.routing\n"
        "from pydantic import BaseModel\n"
        "from . import sibling\n"
        "def lazy():\n"
        "    import torch as t\n"
        "    from server.app import create_app\n"
    )
    assert imported_packages(source) == {"fastapi", "pydantic", "torch", "server"}
