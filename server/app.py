"""create_app(settings): routers, exception handlers, middleware; the lifespan runs the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from engine import AsyncEngine, EngineConfig
from server import __version__
from server.chat_template import load_chat_template
from server.errors import install_exception_handlers
from server.middleware import (
    OPEN_PATHS,
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    DrainMiddleware,
    RequestContextMiddleware,
)
from server.routes import all_routers
from server.routes.ui import PUBLIC_PATHS, ui_router
from server.settings import Settings, resolve_api_keys
from server.state import ServerState

logger = logging.getLogger(__name__)

LoadFailureHandler = Callable[[BaseException], None]
DeathHandler = Callable[[BaseException], None]


def create_app(settings: Settings, engine: AsyncEngine | None = None,
               on_load_failure: LoadFailureHandler | None = None,
               on_engine_death: DeathHandler | None = None) -> FastAPI:
    """The ASGI app. Without `engine`, the lifespan loads one from `settings` in a thread while
    the server already answers (/health is 503 until it is ready). A passed engine (tests
    share one loaded model) is started and shut down by the lifespan all the same.
    `on_load_failure` lets the CLI stop the server when the model cannot load, and
    `on_engine_death` (called on the event loop) when the engine dies later."""
    state = ServerState(settings=settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start_engine(state, engine, on_load_failure,
                                                    on_engine_death))
        try:
            yield
        finally:
            loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loading
            if state.engine is not None:
                logger.info("shutting down the engine")
                await state.engine.shutdown()

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM server with a paged KV cache")
    app.state.server = state
    for router in all_routers():
        app.include_router(router)
    if settings.ui:
        app.include_router(ui_router())
    install_exception_handlers(app)
    _add_middleware(app, state)
    return app


def _add_middleware(app: FastAPI, state: ServerState) -> None:
    # added innermost first: request context wraps draining wraps CORS wraps auth wraps the
    # body limit, so CORS preflights never need a key, every response carries X-Request-Id,
    # and a draining server refuses work before reading a byte of it
    settings = state.settings
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_body_bytes,
                       timeout_s=settings.body_read_timeout)
    api_keys = resolve_api_keys(settings)
    if api_keys:
        # the playground's files are open (the page holds no data; its API calls carry the
        # key), with or without --no-ui: without the routes they are 404 for everyone
        app.add_middleware(ApiKeyMiddleware, api_keys=api_keys,
                           open_paths=OPEN_PATHS | PUBLIC_PATHS)
    if settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"],
                           expose_headers=["X-Request-Id"])
    app.add_middleware(DrainMiddleware, state=state)
    app.add_middleware(RequestContextMiddleware)


async def _start_engine(state: ServerState, engine: AsyncEngine | None,
                        on_load_failure: LoadFailureHandler | None,
                        on_engine_death: DeathHandler | None) -> None:
    settings = state.settings
    try:
        chat_template = (load_chat_template(settings.chat_template)
                         if settings.chat_template is not None else None)
        if engine is None:
            logger.info("loading model %s", settings.model or "<embedded default> (converted "
                        "once on first use, then loaded from the cache)")
            config = EngineConfig.from_kwargs(settings.model, **settings.engine_kwargs())
            engine = await asyncio.to_thread(
                AsyncEngine, config, served_model_name=settings.served_model_name,
                strict_max_model_len=settings.strict_max_model_len,
                metric_names=settings.metrics_names)
        if chat_template is not None:
            engine.tokenizer.chat_template = chat_template
            logger.info("chat template: %s (replacing the tokenizer's)",
                        settings.chat_template if len(settings.chat_template or "") < 200
                        else "inline")
        if on_engine_death is not None:
            loop = asyncio.get_running_loop()
            death_handler = on_engine_death

            def report_death(error: BaseException) -> None:  # from the engine's thread
                loop.call_soon_threadsafe(death_handler, error)

            engine.on_dead = report_death
        await engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.exception("the model failed to load")
        state.load_error = f"{type(exc).__name__}: {exc}"
        if on_load_failure is not None:
            on_load_failure(exc)
        return
    state.served_model_name = settings.served_model_name or engine.model_name
    state.engine = engine
    announce_ready(state)


def announce_ready(state: ServerState) -> None:
    """The one ready line, once the engine is ready and the URL known (`state.url`, set by
    the CLI when it binds). Both sides call this on the event loop right after setting their
    part, so only the second one logs."""
    if state.engine is None or state.url is None:
        return
    summary = state.engine.summary
    num_sequences = summary.num_max_len_sequences
    logger.info(
        "ready: serving %r at %s/v1; %s on %s, %s; KV cache %d blocks = %d tokens, %d "
        "sequence%s of max_model_len %d; kernels: %s; attention: %s; speculative decoding: "
        "%s%s",
        state.served_model_name, state.url, summary.dtype, summary.device,
        f"quantization {summary.quantization}" if summary.quantization else "no quantization",
        summary.num_blocks, summary.num_kv_tokens, num_sequences,
        "" if num_sequences == 1 else "s", summary.max_model_len, summary.kernels,
        summary.attention_backend, summary.speculative or "off",
        f"; {summary.parallel}" if summary.parallel else "")
