"""The deployment files: compose validates (with docker compose itself), Prometheus's config
passes promtool, Grafana's provisioning and dashboard fit together, every PromQL expression in
the dashboard names only metrics a live tiny-model engine exports, and the Dockerfile's
HEALTHCHECK really tells a 200 /health from a 503."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine import AsyncEngine, EngineConfig, SamplingParams

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_GPU = DOCKER / "compose.gpu.yaml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "pagedserve.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "pagedserve.yaml"
DOCKERFILE = ROOT / "Dockerfile"

PROMQL_FUNCTIONS = {
    "histogram_quantile", "rate", "irate", "increase", "sum", "max", "min", "avg", "count",
    "clamp_min", "clamp_max", "topk", "bottomk", "label_values",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and",
                   "or", "unless", "bool", "offset", "inf", "nan"}


def require_tool(found: bool, what: str, install: str) -> None:
    """Skip when a tool is missing on a developer machine; CI (env CI set) must have it."""
    if found:
        return
    message = f"{what} is not installed ({install})"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must install it in .ci/run")
    pytest.skip(message)


# ---- compose ------------------------------------------------------------------------------------

def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin) when it works, else `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.parametrize("files", [[COMPOSE], [COMPOSE, COMPOSE_GPU]], ids=["cpu", "gpu"])
def test_compose_config_validates(files: list[Path]) -> None:
    command = compose_command()
    require_tool(command is not None, "docker compose",
                 "apt-get install -y docker-compose")
    assert command is not None
    args = [part for path in files for part in ("-f", str(path))]
    result = subprocess.run([*command, *args, "config"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    merged = yaml.safe_load(result.stdout)
    assert set(merged["services"]) == {"pagedserve", "prometheus", "grafana"}
    expected_variant = "cuda" if COMPOSE_GPU in files else "cpu"
    assert merged["services"]["pagedserve"]["build"]["args"]["VARIANT"] == expected_variant


def test_compose_wires_the_three_services() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    pagedserve = services["pagedserve"]
    assert (DOCKER / pagedserve["build"]["context"] / pagedserve["build"]["dockerfile"]) \
        .resolve() == DOCKERFILE
    for service in services.values():  # nothing is exposed beyond the host's loopback
        assert all(str(port).startswith("127.0.0.1:") for port in service.get("ports", []))
    container_port = pagedserve["ports"][0].rsplit(":", 1)[1]
    mounts = {name: _bind_mounts(service) for name, service in services.items()}
    prometheus_config = mounts["prometheus"]["/etc/prometheus/prometheus.yml"]
    assert prometheus_config == DOCKER / "prometheus.yml"
    targets = yaml.safe_load(prometheus_config.read_text())["scrape_configs"][0][
        "static_configs"][0]["targets"]
    assert targets == [f"pagedserve:{container_port}"]
    # Grafana: provisioning mounted where Grafana reads it; dashboards where the provider looks
    assert mounts["grafana"]["/etc/grafana/provisioning"] == DOCKER / "grafana" / "provisioning"
    provider_path = yaml.safe_load(PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert mounts["grafana"][provider_path] == DASHBOARD.parent
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider_path}/{DASHBOARD.name}"


def _bind_mounts(service: dict[str, object]) -> dict[str, Path]:
    """Container path -> host path of a service's ./relative bind mounts."""
    mounts = {}
    for volume in service.get("volumes", []):  # type: ignore[attr-defined]
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            host = (DOCKER / source).resolve()
            assert host.exists(), f"{source} does not exist"
            mounts[target] = host
    return mounts


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    require_tool(promtool is not None, "promtool", "apt-get install -y prometheus")
    assert promtool is not None
    result = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Grafana dashboard --------------------------------------------------------------------------

def dashboard_expressions() -> list[str]:
    """Every PromQL expression of the dashboard's panels and template variables."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [str(target["expr"]) for panel in dashboard["panels"]
             for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        exprs.append(str(query["query"] if isinstance(query, dict) else query))
    return exprs


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, function names) in a PromQL expression: strings, label matchers,
    ranges and grouping clauses are dropped first, so label names are not mistaken."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "",
                      stripped)
    stripped = re.sub(r",\s*model_name\s*\)", ")", stripped)  # label_values(metric, label)
    functions = set(re.findall(r"([A-Za-z_:][\w:]*)\s*\(", stripped))
    identifiers = set(re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)", stripped))
    return identifiers - functions - PROMQL_KEYWORDS, functions


def test_promql_names_parser_on_known_expressions() -> None:
    names, functions = promql_names(
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{model_name=~"$m", le!="x"}'
        '[$__rate_interval]))) / on (job) b_total offset 5m')
    assert names == {"a_bucket", "b_total"}
    assert functions == {"histogram_quantile", "sum", "rate"}


@pytest.fixture(scope="module")
def exported_sample_names(tiny_llama_dir: Path) -> set[str]:
    """Sample names in the exposition of a real engine that served one request."""
    registry = CollectorRegistry()
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), dtype="float32", device="cpu",
                                      num_blocks=32, block_size=4)
    engine = AsyncEngine(config, registry=registry)

    async def serve_one() -> None:
        await engine.start()
        try:
            params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
            async for _ in engine.generate("one", [5, 6, 7, 8, 9], params):
                pass
        finally:
            await engine.shutdown()

    asyncio.run(serve_one())
    families = text_string_to_metric_families(generate_latest(registry).decode())
    return {s.name for family in families for s in family.samples}


def test_dashboard_queries_name_only_exported_metrics(exported_sample_names: set[str]) -> None:
    exprs = dashboard_expressions()
    used: set[str] = set()
    for expr in exprs:
        names, functions = promql_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= exported_sample_names, f"{expr!r} names {names - exported_sample_names}"
        assert functions <= PROMQL_FUNCTIONS, f"{expr!r} calls {functions - PROMQL_FUNCTIONS}"
        used |= names
    # what operators need on the dashboard: latency quantiles, throughput, load, cache
    for needed in ("pagedserve_time_to_first_token_seconds_bucket",
                   "pagedserve_inter_token_latency_seconds_bucket",
                   "pagedserve_prompt_tokens_total", "pagedserve_generation_tokens_total",
                   "pagedserve_num_requests_running", "pagedserve_num_requests_waiting",
                   "pagedserve_kv_cache_usage_ratio", "pagedserve_prefix_cache_hits_total",
                   "pagedserve_prefix_cache_queries_total"):
        assert needed in used, f"the dashboard does not plot {needed}"
    for metric in ("time_to_first_token_seconds", "inter_token_latency_seconds"):
        for quantile in ("0.5", "0.9", "0.99"):
            assert any(e.startswith(f"histogram_quantile({quantile},") and metric in e
                       for e in exprs), f"no p{quantile} of {metric}"


def test_dashboard_uses_the_provisioned_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    [datasource] = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for item in [*panels, *dashboard["templating"]["list"]]:
        assert item["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}
        for target in item.get("targets", []):
            assert target["datasource"]["uid"] == datasource["uid"]


# ---- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", "", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_variants_user_and_install() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.partition("=")[::2] for kind, rest in instructions if kind == "ARG")
    assert args["VARIANT"] == "cuda"  # CUDA base by default
    assert args["INSTALL_DEFAULT_MODEL"] == "true"
    froms = [rest for kind, rest in instructions if kind == "FROM"]
    assert froms[0].startswith("nvidia/cuda:") and froms[0].endswith(" AS base-cuda")
    assert froms[1].endswith(" AS base-cpu") and "cuda" not in froms[1]
    assert froms[-1] == "base-${VARIANT} AS runtime"
    users = [rest for kind, rest in instructions if kind == "USER"]
    assert users and users[-1] not in ("root", "0")
    runs = [rest for kind, rest in instructions if kind == "RUN"]
    assert any("pip install --no-cache-dir ." in run for run in runs)
    assert any("DEFAULT_MODEL_PACKAGES" in run for run in runs)
    for kind, rest in instructions:  # every COPY source exists (globs may match nothing)
        if kind == "COPY":
            for source in shlex.split(rest)[:-1]:
                assert "*" in source or (ROOT / source).exists(), f"COPY {source}: missing"
    [entrypoint] = [rest for kind, rest in instructions if kind == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["pagedserve"]


def test_default_model_packages_importable_as_the_dockerfile_does() -> None:
    run = next(rest for kind, rest in dockerfile_instructions()
               if kind == "RUN" and "DEFAULT_MODEL_PACKAGES" in rest)
    code = re.search(r'python -c "([^"]+)"', run)
    assert code is not None
    result = subprocess.run([sys.executable, "-c", code.group(1)], capture_output=True,
                            text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 6 and "==" in result.stdout


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def health_server() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_passes_on_200_and_fails_on_503(
        health_server: http.server.ThreadingHTTPServer) -> None:
    [healthcheck] = [rest for kind, rest in dockerfile_instructions() if kind == "HEALTHCHECK"]
    assert "--start-period=" in healthcheck
    command = shlex.split(healthcheck.split(" CMD ", 1)[1])
    assert command[:2] == ["python", "-c"]
    env = {**os.environ, "PAGEDSERVE_PORT": str(health_server.server_address[1])}
    results = {}
    for status in (200, 503):
        _Health.status = status
        run = subprocess.run([sys.executable, "-c", command[2]], env=env, capture_output=True,
                             timeout=30)
        results[status] = run.returncode
    assert results[200] == 0 and results[503] != 0
