"""Structured logs: one JSON object per line on stderr, with an `event` name and its fields.

Rules: log records carry identifiers and reasons, never tokens, keys or request bodies. Every
`security.*` event also goes to the registered security sinks (the audit log), whatever the log
level.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

LOGGER = logging.getLogger("fleet")
SECURITY_PREFIX = "security."
SecuritySink = Callable[[str, dict[str, Any]], None]
_security_sinks: list[SecuritySink] = []


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "tuf", "tortoise"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log(event: str, level: int = logging.INFO, **fields: Any) -> None:
    LOGGER.log(level, event, extra={"fields": fields})
    if event.startswith(SECURITY_PREFIX):
        for sink in _security_sinks:
            sink(event, fields)


def add_security_sink(sink: SecuritySink) -> None:
    _security_sinks.append(sink)


def remove_security_sink(sink: SecuritySink) -> None:
    if sink in _security_sinks:
        _security_sinks.remove(sink)
