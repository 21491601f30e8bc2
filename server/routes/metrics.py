"""GET /metrics: the Prometheus registry under the names --metrics-names chose, as text or
OpenMetrics depending on Accept."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

from fastapi import APIRouter, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics

from server.state import StateDep

router = APIRouter(tags=["server"])

# the prefix of the names each choice leaves out
_HIDDEN_PREFIX = {"pagedserve": "vllm:", "vllm": "pagedserve_"}


class _Without:
    """A registry's families but those whose name starts with `prefix`. The engine records only
    the names asked for, but the registry is process-wide: another engine of the process
    (tests, a reload) may have recorded the other names."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.registry = registry
        self.prefix = prefix

    def collect(self) -> Iterator[Metric]:
        return (family for family in self.registry.collect()
                if not family.name.startswith(self.prefix))


def exposition(registry: CollectorRegistry, metrics_names: str,
               accept: str) -> tuple[bytes, str]:
    """(body, content type): the registry's families under `metrics_names` ("pagedserve",
    "vllm" or "both"), in the format the Accept header asks for."""
    encoder, content_type = choose_encoder(accept)
    if content_type.startswith("application/openmetrics-text"):
        encoder = _keeping_colons(encoder)
    prefix = _HIDDEN_PREFIX.get(metrics_names)
    if prefix is not None:
        shown = CollectorRegistry()
        shown.register(_Without(registry, prefix))
        registry = shown
    return encoder(registry), content_type


def _keeping_colons(encoder: Callable[..., bytes]) -> Callable[..., bytes]:
    """prometheus_client (0.26) under OpenMetrics' default escaping=underscores rewrites the
    colons of sample names (vllm:prompt_tokens_total -> vllm_prompt_tokens_total; not those
    of HELP and TYPE), though colons are legal in names: Prometheus, which asks for
    OpenMetrics, would then store no vllm:* series. Every name here is a legal one, so no
    escaping applies and allow-utf-8 writes exactly what the announced escaping means."""
    keywords = getattr(encoder, "keywords", {})
    return partial(openmetrics.generate_latest, **{**keywords,
                                                  "escaping": openmetrics.ALLOWUTF8})


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text"}})
async def metrics(request: Request, state: StateDep) -> Response:
    body, content_type = exposition(REGISTRY, state.settings.metrics_names,
                                    request.headers.get("accept", ""))
    return Response(content=body, media_type=content_type)
