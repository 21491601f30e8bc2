"""`pagedserve serve [MODEL] …`: flags + YAML config + env → Settings → uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Literal, get_args, get_origin

from server import __version__
from server.logging_config import configure_logging
from server.settings import Settings, SettingsError, load_settings

logger = logging.getLogger("server.cli")

# idle keep-alive connections live longer than the 5 s after which httpx (and so the OpenAI
# SDKs) drops them: otherwise a client can reuse a connection the server is just closing
KEEP_ALIVE_S = 20
DEATH_EXIT_DELAY_S = 1.0  # after the engine dies, for the clients' errors to go out


# (flag, settings field, argparse options); help, defaults and the choices of a field typed as
# a Literal come from the Settings model
_FLAGS: tuple[tuple[str, str, dict[str, object]], ...] = (
    ("--host", "host", {}),
    ("--port", "port", {"type": int}),
    ("--served-model-name", "served_model_name", {}),
    ("--chat-template", "chat_template", {"metavar": "FILE"}),
    ("--trust-request-chat-template", "trust_request_chat_template", {"action": "store_true"}),
    ("--tool-call-parser", "tool_call_parser", {}),
    ("--reasoning-parser", "reasoning_parser", {}),
    ("--api-key", "api_keys", {"action": "append", "metavar": "KEY"}),
    ("--api-key-file", "api_key_file", {"metavar": "PATH"}),
    ("--allowed-origins", "allowed_origins", {"action": "append", "metavar": "ORIGINS"}),
    ("--no-ui", "ui", {"action": "store_false"}),
    ("--max-request-body-bytes", "max_request_body_bytes", {"type": int}),
    ("--body-read-timeout", "body_read_timeout", {"type": float, "metavar": "SECONDS"}),
    ("--log-level", "log_level", {}),
    ("--log-format", "log_format", {}),
    ("--metrics-names", "metrics_names", {}),
    ("--dtype", "dtype", {}),
    ("--device", "device", {}),
    ("--quantization", "quantization", {}),
    ("--attention-backend", "attention_backend", {}),
    ("--enforce-eager", "enforce_eager", {"action": "store_true"}),
    ("--max-model-len", "max_model_len", {"type": int}),
    ("--max-num-seqs", "max_num_seqs", {"type": int}),
    ("--max-num-batched-tokens", "max_num_batched_tokens", {"type": int}),
    ("--prefill-tokens-while-decoding", "prefill_tokens_while_decoding", {"type": int}),
    ("--kv-cache-memory-gb", "kv_cache_memory_gb", {"type": float}),
    ("--gpu-memory-utilization", "gpu_memory_utilization", {"type": float}),
    ("--block-size", "block_size", {"type": int}),
    ("--num-blocks", "num_blocks", {"type": int}),
    ("--no-prefix-caching", "enable_prefix_caching", {"action": "store_false"}),
    ("--prefix-caching-hash-algo", "prefix_caching_hash_algo", {}),
    ("--max-queue-len", "max_queue_len", {"type": int}),
    ("--seed", "seed", {"type": int}),
    ("--speculative-config", "speculative_config", {"metavar": "JSON"}),
    ("--tensor-parallel-size", "tensor_parallel_size", {"type": int, "metavar": "N"}),
    ("--pipeline-parallel-size", "pipeline_parallel_size", {"type": int, "metavar": "N"}),
    ("--enable-expert-parallel", "enable_expert_parallel", {"action": "store_true"}),
    ("--distributed-timeout", "distributed_timeout_s", {"type": float, "metavar": "SECONDS"}),
    ("--strict-max-model-len", "strict_max_model_len", {"action": "store_true"}),
    ("--allow-pickle", "allow_pickle", {"action": "store_true"}),
    ("--trust-remote-code", "trust_remote_code", {"action": "store_true"}),
    ("--request-timeout", "request_timeout", {"type": float, "metavar": "SECONDS"}),
    ("--shutdown-timeout", "shutdown_timeout", {"type": float, "metavar": "SECONDS"}),
    ("--engine-stall-timeout", "engine_stall_timeout", {"type": float, "metavar": "SECONDS"}),
)


def build_parser() -> argparse.ArgumentParser:
    # SUPPRESS: flags the user did not give stay out of the namespace, so they cannot mask
    # env vars or the config file (precedence flags > env > file > defaults)
    parser = argparse.ArgumentParser(
        prog="pagedserve", argument_default=argparse.SUPPRESS,
        usage="pagedserve serve [MODEL] [options]\n       pagedserve chat [URL] [options]",
        description="OpenAI-compatible LLM server with a paged KV cache. Every flag can also "
        "be set in a YAML file (--config, keys like max_num_seqs) or as an env var "
        "(PAGEDSERVE_MAX_NUM_SEQS); flags win over env, env over the file.",
    )
    parser.add_argument("--version", action="version", version=f"pagedserve {__version__}")
    parser.add_argument("command", choices=["serve", "chat"],
                        help="serve: start the HTTP server; chat: a terminal chat with a "
                        "running one (pagedserve chat --help)")
    parser.add_argument("model", nargs="?", help=_help("model"))
    parser.add_argument("--config", metavar="PATH",
                        help="YAML settings file, e.g. configs/default.yaml (env: "
                        "PAGEDSERVE_CONFIG)")
    for flag, field_name, options in _FLAGS:
        choices = _literal_values(Settings.model_fields[field_name].annotation)
        if choices:
            options = {"choices": choices, **options}
        parser.add_argument(flag, dest=field_name, help=_help(field_name, flag),
                            **options)  # type: ignore[arg-type]
    return parser


def _literal_values(annotation: object) -> tuple[object, ...]:
    """The values a Literal annotation allows, also inside a union (`Literal["int8"] | None`
    gives ("int8",): None is the default, not something to type); () when there is none."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    return tuple(value for arg in get_args(annotation) for value in _literal_values(arg))


def _help(field_name: str, flag: str = "") -> str:
    info = Settings.model_fields[field_name]
    default = info.default
    if flag == "--no-prefix-caching":
        return "turn prefix caching off (default: on)"
    if "default" in str(info.description):
        return str(info.description)
    shown = "none" if default is None or default == () else default
    return f"{info.description} (default: {shown})"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["chat"]:  # the client has options of its own (server/chat_client.py)
        from server.chat_client import main as chat_main

        return chat_main(arguments[1:])
    parser = build_parser()
    args = vars(parser.parse_args(arguments))
    if args.pop("command") == "chat":
        parser.error("chat comes first: pagedserve chat [URL] [options]")
    config_path = args.pop("config", None)
    try:
        settings = load_settings(args, config_path)
    except SettingsError as exc:
        sys.stderr.write(f"pagedserve: {exc}\n")  # before logging exists: a usage error
        return 2
    configure_logging(settings.log_level, settings.log_format)
    logger.info("settings: model=%s device=%s dtype=%s max_num_seqs=%d kv_cache_memory_gb=%s "
                "prefix_caching=%s auth=%s", settings.model or "<embedded default>",
                settings.device, settings.dtype, settings.max_num_seqs,
                settings.kv_cache_memory_gb, settings.enable_prefix_caching,
                "on" if settings.api_keys or settings.api_key_file else "off")
    return serve(settings)


def serve(settings: Settings) -> int:
    """Run uvicorn until stopped; 1 if the model failed to load or the engine died, else 0.
    A non-zero rank of a torchrun world runs its worker loop instead."""
    from engine import EngineConfig, serve_worker_rank, torchrun_rank

    if torchrun_rank():
        config = EngineConfig.from_kwargs(settings.model, **settings.engine_kwargs())
        serve_worker_rank(config)  # no HTTP server on this rank
        return 0
    import uvicorn  # imported here so `pagedserve --help` stays fast

    from server.app import announce_ready, create_app
    from server.shutdown import GracefulServer

    failures: list[BaseException] = []

    class Server(GracefulServer):
        async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
            await super().startup(sockets)
            if self.started:
                host, port = self.servers[0].sockets[0].getsockname()[:2]
                url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
                logger.info("listening on %s (/health turns 200 once the model is ready)",
                            url)
                app.state.server.url = url
                announce_ready(app.state.server)  # logs now if the model was ready first

    def on_load_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    def on_engine_death(exc: BaseException) -> None:
        # the clients have their errors; a moment for them to go out, then exit non-zero so
        # that a supervisor restarts the server
        logger.error("the engine died (%r): stopping with status 1 in %g s", exc,
                     DEATH_EXIT_DELAY_S)
        failures.append(exc)
        asyncio.get_running_loop().call_later(DEATH_EXIT_DELAY_S, stop)

    def stop() -> None:
        server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure, on_engine_death=on_engine_death)
    server = Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                                   access_log=False, log_level=settings.log_level,
                                   timeout_keep_alive=KEEP_ALIVE_S),
                    app.state.server)
    # the first signals drain (GracefulServer); a signal uvicorn itself handles is re-raised
    # against the handlers it found once it stops: make those end the process with status 0
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        server.run()
    except (KeyboardInterrupt, _Stopped):
        logger.info("stopped")
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 1 if failures else 0


class _Stopped(Exception):
    """SIGTERM arrived (after uvicorn's graceful shutdown)."""


def _raise_stopped(signum: int, frame: object) -> None:
    raise _Stopped()


if __name__ == "__main__":
    raise SystemExit(main())
