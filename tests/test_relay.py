"""The relay alone: a server that raises OSError from send() (ASGI 2.4: the client is gone)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
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


class _Endless:
    """A response body that never ends (server-sent events, say)."""

    def __init__(self) -> None:
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        self.closed = True


class _ReadsBodyThenAnswers(Handler):
    def __init__(self, response: Response) -> None:
        self.response = response
        self.body = b""

    async def handle_request(self, request: Request) -> Response:
        self.body = b"".join([chunk async for chunk in request.body])
        return self.response


@pytest.mark.anyio
async def test_client_leaving_after_a_streamed_body_ends_the_relay() -> None:
    # The disconnect is only received once the streamed body has been read by the transport.
    messages = [
        {"type": "http.request", "body": b"one", "more_body": True},
        {"type": "http.request", "body": b"two", "more_body": False},
        {"type": "http.disconnect"},
    ]
    disconnect_read = anyio.Event()

    async def receive() -> dict[str, Any]:
        if not messages:
            await anyio.sleep_forever()
        message = messages.pop(0)
        if message["type"] == "http.disconnect":
            disconnect_read.set()
        return message

    async def rest() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            yield message["body"]
            if not message["more_body"]:
                return

    stream = _Endless()
    handler = _ReadsBodyThenAnswers(Response(200, [], stream))
    request = _request()
    request.body = RequestBody([], None, rest())
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(5):
        status, error = await relay(handler, request, receive, send, False)
    assert status == 499 and isinstance(error, ClientDisconnected)
    assert handler.body == b"onetwo"
    assert disconnect_read.is_set() and stream.closed
