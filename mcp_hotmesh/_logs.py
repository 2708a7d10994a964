"""Logging for every command: readable lines, or JSON lines (``--log-format json``), always on stderr.

A JSON line has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``; ``exc`` when an exception is
attached; and any ``extra=`` fields of the record. One object per line, nothing else, so a log shipper can
read stderr as it is.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in data:
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


def configure(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr), as text or JSON lines."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, str(level).upper(), logging.INFO))
    # asyncpg's pool logs each failed attempt to refill itself with a traceback, while the server is away or
    # refuses the login: our own loops already say so, once per change (_retry.Backoff).
    logging.getLogger("asyncpg.pool").setLevel(max(root.level, logging.ERROR))


def error_line(command: str, message: str, fmt: str) -> str:
    """The one line a failed command writes to stderr."""
    if fmt == "json":
        return json.dumps({
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"), "level": "ERROR",
            "logger": "mcp_hotmesh.cli", "message": f"mcp-hotmesh {command}: error: {message}", "command": command,
        }, ensure_ascii=False) + "\n"
    return f"mcp-hotmesh {command}: error: {message}\n"
