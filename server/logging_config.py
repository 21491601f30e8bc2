"""Process logging set-up for the CLI: human-readable text lines, or one JSON object per line
(`--log-format json`) for log shippers."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import TextIO

from server.middleware import RequestIdFilter

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"

# attributes every LogRecord has; anything else on a record came in through `extra=`
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601), level, logger, message, request_id,
    the record's `extra` fields, and the exception text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold is logged as its text, never dropped
        return json.dumps(entry, default=str, ensure_ascii=False)


def build_handler(log_format: str = "text", stream: TextIO | None = None) -> logging.Handler:
    """A stderr handler (or `stream`) that adds request_id and formats as asked."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    return handler


def configure_logging(level: str, log_format: str = "text") -> None:
    """Route every logger (uvicorn's too: it runs with log_config=None) to one handler."""
    root = logging.getLogger()
    root.handlers[:] = [build_handler(log_format)]
    root.setLevel(level.upper())
