"""Log records as JSON: `JsonFormatter`."""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Sequence
from typing import Any, Final

_STANDARD_RECORD_KEYS: Final = frozenset(
    [*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName"]
)


class JsonFormatter(logging.Formatter):
    """Formats each record as one JSON object per line, with its `extra` fields.

    `{"time": "2025-01-31T12:00:00.123+00:00", "level": "INFO", "logger":
    "asgi_gateway.access", "message": "...", "route": "/api/users", "status": 200, ...}`.
    Switch it on for the access log with::

        handler = logging.StreamHandler()
        handler.setFormatter(asgi_gateway.JsonFormatter())
        logging.getLogger("asgi_gateway.access").addHandler(handler)
        logging.getLogger("asgi_gateway.access").setLevel(logging.INFO)

    `fields` limits the extra fields written (all of them by default).
    """

    def __init__(self, *, fields: Sequence[str] | None = None) -> None:
        super().__init__()
        self.fields = tuple(fields) if fields is not None else None

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.fields is None:
            for key, value in record.__dict__.items():
                if key not in _STANDARD_RECORD_KEYS and key not in data and not key.startswith("_"):
                    data[key] = value
        else:
            for key in self.fields:
                if key in record.__dict__:
                    data[key] = record.__dict__[key]
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, separators=(",", ":"), ensure_ascii=False)
