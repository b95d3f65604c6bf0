"""Process-wide logging: JSON lines (one object per record, for log
collectors) or plain text for people, per SLED_LOG_FORMAT / SLED_LOG_LEVEL.

Fields passed with ``log.info("...", extra={"session_id": sid})`` become keys
of the JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO

from sled_shared.settings import CommonSettings

FORMATS = ("json", "text")
_TEXT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str | None = None) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.service:
            out["service"] = self.service
        out.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _Handler(logging.StreamHandler):
    """Marks the handler this module installed, so a second setup replaces it."""


def setup_logging(
    level: str = "INFO",
    fmt: str = "json",
    *,
    service: str | None = None,
    stream: IO[str] | None = None,
) -> None:
    name = level.strip().upper()
    if not isinstance(logging.getLevelName(name), int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {FORMATS}")
    handler = _Handler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)


def setup_from_settings(settings: CommonSettings, service: str) -> None:
    setup_logging(settings.log_level, settings.log_format, service=service)
