"""The relay alone: a server that raises OSError from send() (ASGI 2.4: the client is gone)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from asgi_gateway._config import ServerConfig, UpstreamConfig
from asgi_gateway._proxy import ClientDisconnected, relay
from asgi_gateway._types import BufferedStream, Exchange, Handler, Request, RequestBody, Response


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class _Chunks:
    """A body arriving in two chunks."""

    def __init__(self) -> None:
        self.left = [b"a", b"b"]
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self.left:
            raise StopAsyncIteration
        return self.left.pop(0)

    async def aclose(self) -> None:
        self.closed = True


class _Answer(Handler):
    def __init__(self, response: Response) -> None:
        self.response = response

    async def handle_request(self, request: Request) -> Response:
        return self.response


def _request() -> Request:
    upstream = UpstreamConfig(name="u", servers=(ServerConfig("http://127.0.0.1:9001"),))
    exchange = Exchange("req-1", "/", upstream, "127.0.0.1", "/x", "http")
    return Request("GET", b"/x", [], RequestBody([], None), exchange)


async def _receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def _send_failing_on(kind: str) -> Any:
    sent: list[str] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == kind:
            raise OSError("client gone")
        sent.append(message["type"])

    send.sent = sent  # type: ignore[attr-defined]
    return send


@pytest.mark.anyio
@pytest.mark.parametrize("body", ["buffered", "streamed"])
async def test_oserror_sending_the_head_is_a_client_disconnect(body: str) -> None:
    closed: list[BaseException | None] = []
    stream = BufferedStream(b"whole") if body == "buffered" else _Chunks()
    response = Response(200, [(b"content-type", b"text/plain")], stream)
    response.on_close(lambda response, error: closed.append(error))
    send = _send_failing_on("http.response.start")
    status, error = await relay(_Answer(response), _request(), _receive, send, True)
    assert status == 200 and isinstance(error, ClientDisconnected)
    # The upstream response is released, told why it was not read to its end.
    assert len(closed) == 1 and isinstance(closed[0], ClientDisconnected)
    assert send.sent == []


@pytest.mark.anyio
async def test_oserror_sending_the_body_is_a_client_disconnect() -> None:
    stream = _Chunks()
    response = Response(200, [], stream)
    send = _send_failing_on("http.response.body")
    status, error = await relay(_Answer(response), _request(), _receive, send, True)
    assert status == 200 and isinstance(error, ClientDisconnected)
    assert stream.closed
    assert send.sent == ["http.response.start"]
