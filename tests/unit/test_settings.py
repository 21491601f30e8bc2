"""Settings: precedence flags > env > file > defaults, YAML/env parsing, the CLI's flags."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineConfig
from server.cli import _FLAGS, build_parser
from server.settings import (
    ENGINE_FIELDS,
    Settings,
    SettingsError,
    load_settings,
    read_env,
    resolve_api_keys,
)

REPO = Path(__file__).resolve().parents[2]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _flags(*argv: str) -> dict[str, object]:
    args = vars(build_parser().parse_args(["serve", *argv]))
    args.pop("command")
    args.pop("config", None)
    return args


def test_defaults_match_engine_config() -> None:
    """The server's engine defaults are the engine's own, so `pagedserve serve` with no flags
    runs the engine exactly as EngineConfig() would."""
    settings = Settings()
    built = EngineConfig.from_kwargs(settings.model, **settings.engine_kwargs())
    assert built == EngineConfig()
    assert settings.host == "127.0.0.1"
    assert settings.api_keys == () and settings.allowed_origins == ()


@pytest.mark.parametrize("field", ["port", "max_num_seqs", "log_level"])
def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path, field: str) -> None:
    values = {"port": ("9001", "9002", "9003"), "max_num_seqs": ("3", "5", "7"),
              "log_level": ("warning", "error", "debug")}[field]
    file_value, env_value, flag_value = values
    config = _write(tmp_path / "c.yaml", f"{field.replace('_', '-')}: {file_value}\n")
    env = {f"PAGEDSERVE_{field.upper()}": env_value}
    flag = ["--" + field.replace("_", "-"), flag_value]
    default = Settings.model_fields[field].default

    assert getattr(load_settings({}, None, {}), field) == default
    assert str(getattr(load_settings({}, config, {}), field)) == file_value
    assert str(getattr(load_settings({}, config, env), field)) == env_value
    assert str(getattr(load_settings(_flags(*flag), config, env), field)) == flag_value
    # a flag the user did not give must not mask the env or file value
    assert str(getattr(load_settings(_flags(), config, env), field)) == env_value


def test_yaml_accepts_kebab_and_snake_case_and_aliases(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "max-num-seqs: 4\nkv_cache_memory_gb: 0.5\n"
                    "api_key: secret\nallowed-origins: http://a, http://b\n")
    settings = load_settings({}, config, {})
    assert settings.max_num_seqs == 4 and settings.kv_cache_memory_gb == 0.5
    assert settings.api_keys == ("secret",)
    assert settings.allowed_origins == ("http://a", "http://b")


@pytest.mark.parametrize("text, needle", [
    ("max_num_sqes: 4\n", "max_num_sqes"),
    ("port: eighty\n", "port"),
    ("dtype: float8\n", "dtype"),
    ("- a\n- b\n", "mapping"),
    ("port: [unclosed\n", "cannot read"),
])
def test_bad_config_file_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings({}, _write(tmp_path / "c.yaml", text), {})


def test_env_parsing() -> None:
    env = {"PAGEDSERVE_API_KEY": "k1, k2", "PAGEDSERVE_ENABLE_PREFIX_CACHING": "false",
           "PAGEDSERVE_MAX_QUEUE_LEN": "", "PAGEDSERVE_NOT_A_SETTING": "x",
           "HOME": "/root", "PAGEDSERVE_KV_CACHE_MEMORY_GB": "0.25"}
    assert read_env(env) == {"api_keys": ["k1", "k2"], "enable_prefix_caching": "false",
                             "kv_cache_memory_gb": "0.25"}
    settings = load_settings({}, None, env)
    assert settings.api_keys == ("k1", "k2")
    assert settings.enable_prefix_caching is False
    assert settings.max_queue_len is None  # empty value: unset
    assert settings.kv_cache_memory_gb == 0.25


def test_config_path_from_env(tmp_path: Path) -> None:
    config = _write(tmp_path / "c.yaml", "port: 1234\n")
    assert load_settings({}, None, {"PAGEDSERVE_CONFIG": str(config)}).port == 1234


def test_cli_flags_map_to_settings() -> None:
    flags = _flags("/models/x", "--port", "9", "--no-prefix-caching", "--api-key", "a",
                   "--api-key", "b", "--allowed-origins", "http://x,http://y",
                   "--max-queue-len", "5", "--dtype", "float32", "--num-blocks", "64",
                   "--quantization", "int8")
    settings = load_settings(flags, None, {"PAGEDSERVE_API_KEY": "from-env"})
    assert settings.model == "/models/x" and settings.port == 9
    assert settings.enable_prefix_caching is False
    assert settings.api_keys == ("a", "b")  # repeated flags replace the env's keys
    assert settings.allowed_origins == ("http://x", "http://y")
    assert settings.max_queue_len == 5 and settings.dtype == "float32"
    kwargs = settings.engine_kwargs()
    assert kwargs["num_blocks"] == 64 and kwargs["enable_prefix_caching"] is False
    assert kwargs["quantization"] == "int8"
    assert set(kwargs) == set(ENGINE_FIELDS)


def test_every_setting_has_a_flag_with_help() -> None:
    covered = {field for _, field, _ in _FLAGS} | {"model"}
    assert covered == set(Settings.model_fields)
    help_text = build_parser().format_help()
    for flag, _, _ in _FLAGS:
        assert flag in help_text
    for name, info in Settings.model_fields.items():
        assert info.description, f"{name} has no help text"


def test_bad_flag_value_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "port" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["default.yaml", "gpu.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    settings = load_settings({}, REPO / "configs" / name, {})
    EngineConfig.from_kwargs(settings.model, **settings.engine_kwargs())  # the engine agrees
    assert settings.host == "127.0.0.1"


def test_api_key_file(tmp_path: Path) -> None:
    keys = _write(tmp_path / "keys", "# team keys\nalpha\n\n  beta  \n")
    settings = load_settings({"api_keys": ["gamma"], "api_key_file": str(keys)}, None, {})
    assert resolve_api_keys(settings) == ("gamma", "alpha", "beta")
    missing = Settings(api_key_file=str(tmp_path / "nope"))
    with pytest.raises(SettingsError, match="api_key_file"):
        resolve_api_keys(missing)


def test_python_dash_m_server_help() -> None:
    result = subprocess.run([sys.executable, "-m", "server", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--max-num-batched-tokens" in result.stdout and "--no-prefix-caching" in result.stdout


def test_log_format_flag_reaches_settings_and_json_lines_parse() -> None:
    from server.logging_config import build_handler

    args = vars(build_parser().parse_args(["serve", "--log-format", "json"]))
    args.pop("command")
    assert load_settings(args, None, environ={}).log_format == "json"
    assert load_settings({}, None, environ={}).log_format == "text"
    stream = io.StringIO()
    log = logging.getLogger("pagedserve.test.json")
    log.addHandler(build_handler("json", stream))
    log.propagate = False
    log.warning("hello %s", "world")
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "hello world" and entry["level"] == "WARNING"


def test_speculative_config_from_a_flag_a_yaml_mapping_or_env(tmp_path: Path) -> None:
    """vLLM's --speculative-config JSON; the same object as a YAML mapping or env JSON; the
    engine gets it as its SpeculativeConfig."""
    flag = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}'
    from_flag = load_settings(_flags("--speculative-config", flag), None, {})
    config = _write(tmp_path / "spec.yaml", "speculative_config:\n  method: ngram\n"
                    "  num_speculative_tokens: 3\n  prompt_lookup_max: 3\n")
    from_yaml = load_settings({}, config, {})
    from_env = load_settings({}, None, {"PAGEDSERVE_SPECULATIVE_CONFIG": flag})
    for settings in (from_flag, from_yaml, from_env):
        engine = EngineConfig.from_kwargs(settings.model, **settings.engine_kwargs())
        assert engine.speculative is not None
        assert (engine.speculative.method, engine.speculative.num_speculative_tokens,
                engine.speculative.prompt_lookup_min, engine.speculative.prompt_lookup_max) == (
            "ngram", 3, 2, 3)
    draft = load_settings(_flags("--speculative-config", '{"model": "/d"}'), None, {})
    assert EngineConfig.from_kwargs(None, **draft.engine_kwargs()).speculative.method == (
        "draft_model")  # type: ignore[union-attr]


@pytest.mark.parametrize("value, needle", [
    ("{not json", "not valid JSON"),
    ('["ngram"]', "must be an object"),
    ('{"method": "ngram", "lookahead": 3}', "unknown keys ['lookahead']"),
    ('{"method": "medusa"}', "method must be one of"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
])
def test_bad_speculative_config_fails_at_startup(value: str, needle: str) -> None:
    with pytest.raises(SettingsError, match="speculative_config") as info:
        load_settings(_flags("--speculative-config", value), None, {})
    assert needle in str(info.value)
