"""The access log: one record per proxied request and WebSocket session; `JsonFormatter`.

`access_log` writes the record `Telemetry.finish` asks for (on the `asgi_gateway.access`
logger, at INFO, with the fields also as the record's `extra`); `JsonFormatter` turns
records into JSON lines.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol

from opentelemetry import trace

from ._semconv import error_type
from ._types import Exchange

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["JsonFormatter", "access_log", "access_logger"]

access_logger = logging.getLogger("asgi_gateway.access")

_REQUEST_RECORD: Final = "%s %s %d %.1fms route=%s upstream=%s server=%s attempts=%d request_id=%s"
_SESSION_RECORD: Final = "WebSocket %s %d %.1fms route=%s upstream=%s server=%s attempts=%d messages=%d/%d close=%s by=%s request_id=%s"


class _Request(Protocol):
    """What the access log reads of a request's `_telemetry.Pending`."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def span(self) -> Span | None: ...
    @property
    def traced(self) -> Span | None: ...


class _Session(_Request, Protocol):
    """What it reads besides of a session's `_telemetry.SessionPending`."""

    @property
    def to_upstream(self) -> int: ...
    @property
    def to_client(self) -> int: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def closed_by(self) -> str | None: ...


def access_log(
    token: _Request,
    session: _Session | None,
    exchange: Exchange,
    status: int,
    error: BaseException | None,
    duration: float,
    report: Callable[[str, BaseException], None],
) -> None:
    """Log the access record of a request, or of a session when `session` (the same token) is
    given; whatever fails is handed to `report`, never raised."""
    server = exchange.server.url if exchange.server is not None else None
    try:
        extra: dict[str, Any] = {
            "route": exchange.route,
            "upstream": exchange.upstream.name,
            "server": server,
            "method": token.method,
            "path": token.path,
            "upstream_path": exchange.path,
            "status": status,
            "attempts": exchange.attempts,
            "duration": duration,
            "request_id": exchange.request_id,
            "client": exchange.client_ip or None,
            "error": error_type(error) if error is not None else None,
        }
        if exchange.auth_result is not None:
            extra["auth"] = exchange.auth_result
        if exchange.rate_limit_result is not None:
            extra["rate_limit"] = exchange.rate_limit_result
        head: tuple[object, ...]
        tail: tuple[object, ...]
        if session is not None:
            record = _SESSION_RECORD
            head = (session.path,)
            tail = (
                session.to_upstream,
                session.to_client,
                session.close_code if session.close_code is not None else "-",
                session.closed_by or "-",
            )
            extra["websocket_messages_to_upstream"] = session.to_upstream
            extra["websocket_messages_to_client"] = session.to_client
            extra["websocket_close_code"] = session.close_code
            extra["websocket_closed_by"] = session.closed_by
        else:
            record = _REQUEST_RECORD
            head = (token.method, token.path)
            tail = ()
            span = token.span or token.traced or trace.get_current_span()
            extra["trace_id"], extra["span_id"] = _trace_ids(span)
        access_logger.info(
            record,
            *head,
            status,
            duration * 1000,
            exchange.route,
            exchange.upstream.name,
            server or "-",
            exchange.attempts,
            *tail,
            exchange.request_id,
            extra=extra,
        )
    except Exception as exc:
        report("access log", exc)


def _trace_ids(span: Span) -> tuple[str | None, str | None]:
    """The trace and span ids the access log names, in their hex forms (None when invalid)."""
    span_context = span.get_span_context()
    if not span_context.is_valid:
        return None, None
    return trace.format_trace_id(span_context.trace_id), trace.format_span_id(span_context.span_id)


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
