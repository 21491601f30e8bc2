"""--metrics-names through real in-process servers: /metrics exports only the names chosen,
even when the process-wide registry holds the others (another engine recorded them), in both
exposition formats; and a chat request sent with the openai SDK counts as vLLM counts it.
The real Prometheus scraping vLLM's names, and vLLM's dashboard, are in test_prometheus.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families

from server.cli import build_parser
from server.settings import SettingsError, load_settings
from tests.integration.conftest import MODEL_NAME, RunningServer, serve

OPENMETRICS = "application/openmetrics-text;version=1.0.0"
PREFIXES = {"pagedserve": "pagedserve_", "vllm": "vllm:"}


def sample_names(server: RunningServer, accept: str = "") -> set[str]:
    response = httpx.get(f"{server.base_url}/metrics", headers={"Accept": accept}, timeout=10)
    assert response.status_code == 200
    parse = parse_om if accept else text_string_to_metric_families
    return {s.name for family in parse(response.text) for s in family.samples}


def vllm_value(server: RunningServer, name: str, **labels: str) -> float:
    response = httpx.get(f"{server.base_url}/metrics", timeout=10)
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            if s.name == name and s.labels == {"model_name": MODEL_NAME, "engine": "0",
                                               **labels}:
                return s.value
    raise AssertionError(f"{name}{labels} is not exported")


def test_only_the_chosen_names_are_exported(tiny_llama_dir: Path) -> None:
    """A server exporting both first: the registry then holds both namings' families, with
    series, and each other choice must still show only its own."""
    with serve(tiny_llama_dir, {"metrics_names": "both"}, num_blocks=64) as server:
        server.client().completions.create(model=MODEL_NAME, prompt="hello", max_tokens=2)
        both = sample_names(server)
        assert {"pagedserve_generation_tokens_total", "vllm:generation_tokens_total"} <= both
    for names, prefix in PREFIXES.items():
        other = PREFIXES["vllm" if names == "pagedserve" else "pagedserve"]
        with serve(tiny_llama_dir, {"metrics_names": names}, num_blocks=64) as server:
            server.client().completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
            for accept in ("", OPENMETRICS):
                exported = sample_names(server, accept)
                assert f"{prefix}generation_tokens_total" in exported, (names, accept)
                assert not [name for name in exported if name.startswith(other)], (names, accept)
                # the process' own metrics stay, as on vLLM
                assert "process_cpu_seconds_total" in exported


def test_a_chat_request_counts_as_vllm_counts_it(tiny_llama_dir: Path) -> None:
    """n=2 is two requests for vLLM, each with its prompt and its max_tokens; counted from the
    change, since the registry is process-wide."""
    with serve(tiny_llama_dir, {"metrics_names": "vllm"}, num_blocks=64) as server:
        names = ("vllm:request_success_total", "vllm:request_params_max_tokens_sum",
                 "vllm:request_params_n_sum", "vllm:request_params_n_count",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total")
        labels = ({"finished_reason": "length"}, {}, {}, {}, {}, {})
        before = [vllm_value(server, name, **kw) for name, kw in zip(names, labels, strict=True)]
        chat = server.client().chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "count"}], n=2, max_tokens=4,
            temperature=1.0, seed=3, extra_body={"ignore_eos": True})
        server.wait_idle()
        after = [vllm_value(server, name, **kw) for name, kw in zip(names, labels, strict=True)]
    usage = chat.usage
    assert usage is not None and usage.completion_tokens == 8
    delta = [a - b for a, b in zip(after, before, strict=True)]
    assert delta == [2, 8, 2, 1, 2 * usage.prompt_tokens, 8]


def test_the_flag_env_and_file_spellings(tmp_path: Path) -> None:
    flags = vars(build_parser().parse_args(["serve", "--metrics-names", "vllm"]))
    flags.pop("command")
    assert load_settings(flags, None, {}).metrics_names == "vllm"
    assert load_settings({}, None, {"PAGEDSERVE_METRICS_NAMES": "both"}).metrics_names == "both"
    config = tmp_path / "c.yaml"
    config.write_text("metrics-names: vllm\n")
    assert load_settings({}, config, {}).metrics_names == "vllm"
    assert load_settings({}, None, {}).metrics_names == "pagedserve"
    with pytest.raises(SettingsError, match="metrics_names"):
        load_settings({}, None, {"PAGEDSERVE_METRICS_NAMES": "sglang"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--metrics-names", "sglang"])
