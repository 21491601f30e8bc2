"""Security defaults without a running server: constant-time key checks, where keys come from,
safe defaults (loopback host, CORS off, no pickle, no remote code), the sandboxed chat
template, and a checkpoint shipping its own Python code not being run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import server.middleware as middleware
from engine import EngineConfig
from server.chat_template import TemplateOptions, apply_chat_template
from server.errors import ApiError
from server.middleware import ApiKeyMiddleware, key_matches
from server.protocol import ChatMessage
from server.settings import Settings, load_settings, resolve_api_keys
from tests.tiny_models import build_tokenizer

KEYS = (b"sk-alpha-0001", b"sk-alpha-0002", b"sk-beta")


class CompareSpy:
    """Wraps hmac.compare_digest, recording each comparison."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.calls: list[tuple[bytes, bytes]] = []

    def __call__(self, a: bytes, b: bytes) -> bool:
        self.calls.append((a, b))
        return bool(self.real(a, b))  # type: ignore[operator]


@pytest.fixture()
def compare_spy(monkeypatch: pytest.MonkeyPatch) -> CompareSpy:
    spy = CompareSpy(middleware.hmac.compare_digest)
    monkeypatch.setattr(middleware.hmac, "compare_digest", spy)
    return spy


@pytest.mark.parametrize("given", [b"sk-alpha-0002", b"sk-alpha-0003", b"sk-", b"", b"x" * 64])
def test_keys_are_compared_with_compare_digest_against_every_key(
        compare_spy: CompareSpy, given: bytes) -> None:
    """Every configured key is compared, by hmac.compare_digest, whatever the outcome: neither
    a shared prefix nor the position of the matching key changes the work done."""
    assert key_matches(given, KEYS) == (given in KEYS)
    assert compare_spy.calls == [(given, key) for key in KEYS]


def test_middleware_checks_the_bearer_token_through_compare_digest(
        compare_spy: CompareSpy) -> None:
    auth = ApiKeyMiddleware(app=None, api_keys=[k.decode() for k in KEYS])  # type: ignore[arg-type]

    def scope(header: str) -> dict[str, object]:
        return {"type": "http", "headers": [(b"authorization", header.encode())]}

    assert auth.is_authorized(scope("Bearer sk-beta"))  # type: ignore[arg-type]
    assert compare_spy.calls[-len(KEYS):] == [(b"sk-beta", key) for key in KEYS]
    assert not auth.is_authorized(scope("Bearer sk-alpha-0009"))  # type: ignore[arg-type]
    assert not auth.is_authorized(scope("Token sk-beta"))  # type: ignore[arg-type]


def test_api_keys_from_flags_env_and_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nsk-file-1\n\n  sk-file-2  \n")
    from_env = load_settings({}, None, {"PAGEDSERVE_API_KEY": "sk-env-1,sk-env-2",
                                        "PAGEDSERVE_API_KEY_FILE": str(key_file)})
    assert resolve_api_keys(from_env) == ("sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2")
    from_flags = load_settings({"api_keys": ["sk-flag"]}, None, {"PAGEDSERVE_API_KEY": "sk-env"})
    assert resolve_api_keys(from_flags) == ("sk-flag",)


def test_safe_defaults() -> None:
    settings = Settings()
    assert settings.host == "127.0.0.1"
    assert settings.allowed_origins == () and settings.api_keys == ()
    assert settings.allow_pickle is False and settings.trust_remote_code is False
    config = EngineConfig.from_kwargs(settings.model, **settings.engine_kwargs())
    assert config.model.allow_pickle is False and config.model.trust_remote_code is False
    opted_in = Settings(allow_pickle=True, trust_remote_code=True)
    config = EngineConfig.from_kwargs(None, **opted_in.engine_kwargs())
    assert config.model.allow_pickle and config.model.trust_remote_code


ESCAPES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ self._TemplateReference__context.joiner.__init__.__globals__.os.popen('touch {marker}')"
    ".read() }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_chat_template_runs_in_a_sandbox(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template.replace("{marker}", str(marker))
    with pytest.raises(ApiError) as info:
        apply_chat_template(tokenizer, [ChatMessage(role="user", content="hi")], 512)
    assert info.value.status == 400
    assert not marker.exists()


def test_chat_template_kwargs_cannot_swap_the_template() -> None:
    tokenizer = build_tokenizer()
    with pytest.raises(ApiError, match="chat_template"):
        apply_chat_template(tokenizer, [ChatMessage(role="user", content="hi")], 512,
                            TemplateOptions(chat_template_kwargs={"chat_template": "{{ 1 }}"}))


def test_checkpoint_code_is_not_run_without_trust_remote_code(tiny_llama_dir: Path,
                                                              tmp_path: Path) -> None:
    from engine.loader import load_model

    model_dir = tmp_path / "remote-code-model"
    shutil.copytree(tiny_llama_dir, model_dir)
    marker = tmp_path / "imported"
    (model_dir / "evil_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil_config.EvilConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="(?i)trust_remote_code|evil|not recogni"):
        load_model(str(model_dir), dtype="float32", device="cpu")
    assert not marker.exists()


def test_reliability_and_trust_flags_reach_the_settings() -> None:
    from server.cli import build_parser

    args = vars(build_parser().parse_args([
        "serve", "m", "--request-timeout", "12.5", "--shutdown-timeout", "3",
        "--engine-stall-timeout", "9", "--strict-max-model-len", "--allow-pickle",
        "--trust-remote-code"]))
    args.pop("command")
    settings = load_settings(args, None, {})
    assert settings.request_timeout == 12.5 and settings.shutdown_timeout == 3.0
    assert settings.engine_stall_timeout == 9.0 and settings.strict_max_model_len
    assert settings.allow_pickle and settings.trust_remote_code
    defaults = Settings()
    assert defaults.request_timeout is None and defaults.shutdown_timeout == 30.0
    assert not defaults.strict_max_model_len
