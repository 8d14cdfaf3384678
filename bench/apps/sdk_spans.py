"""The yardstick for tracing cost: the SDK's own SERVER and CLIENT spans, made the plainest way
around a gateway whose tracing is off. Used by bench/apps/gateway_app.py (under load) and
bench/instructions.py (counted)."""

from __future__ import annotations

from typing import Any

from opentelemetry import context, trace

from asgi_gateway._types import Request, Response, Transport

__all__ = ["ClientSpans", "server_spans"]


class ClientSpans(Transport):
    """The SDK's CLIENT span around each attempt, made the plainest way (the yardstick)."""

    def __init__(self, inner: Transport, tracer: trace.Tracer) -> None:
        self.inner = inner
        self.tracer = tracer

    async def handle_request(self, request: Request) -> Response:
        server = request.server
        assert server is not None
        span = self.tracer.start_span(
            request.method,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": request.method,
                "server.address": server.host,
                "server.port": server.port,
                "url.full": server.url + request.target.decode("latin-1"),
            },
        )
        try:
            response = await self.inner.handle_request(request)
        except BaseException:
            span.end()
            raise
        span.set_attribute("http.response.status_code", response.status)
        response.on_close(lambda response, error: span.end())
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def server_spans(gateway: Any, tracer: trace.Tracer) -> Any:
    """The SDK's SERVER span around each request, current while the gateway handles it."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await gateway(scope, receive, send)
            return
        client = scope.get("client")
        span = tracer.start_span(
            f"{scope['method']} /",
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.route": "/",
                "http.request.method": scope["method"],
                "url.path": scope["path"],
                "url.scheme": scope["scheme"],
                "gateway.upstream": "backend",
                "client.address": client[0] if client else "",
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        try:
            await gateway(scope, receive, send)
        finally:
            span.set_attribute("http.response.status_code", 200)
            span.end()
            context.detach(token)

    return app
