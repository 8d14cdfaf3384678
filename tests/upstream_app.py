"""A test upstream: a plain ASGI app (no framework) that the test suite runs under uvicorn.

Run it with ``python tests/upstream_app.py --port PORT`` (``tests.servers.UpstreamProcess`` does);
its name comes from the ``UPSTREAM_NAME`` environment variable and is reported by every response
in the ``x-upstream-name`` header (and in the JSON body of ``echo``).

Choosing an operation
---------------------
The operation is the ``op`` query parameter if there is one, else the path's last segment,
else ``echo``. A last segment that names no operation (``/api/users/7``) also means ``echo``.
So any gateway route prefix works, with or without ``strip_prefix``::

    /api/users/echo     /echo     /api/users/anything?op=stream&n=3     /api/users/7  (echo)

Admin endpoints are recognised by a ``__admin`` segment anywhere in the path; the segment after
it is the admin operation (``/__admin/stats``, ``/api/users/__admin/stats``).

Operations (query parameters in brackets)
-----------------------------------------
- ``echo`` (any method): JSON ``{server, op, method, path, raw_path, query_string, headers,
  body_sha256, body_length, body, client, http_version}``. ``raw_path`` and ``query_string``
  are latin-1 decoded from the raw bytes, ``headers`` is a list of ``[name, value]`` pairs in
  arrival order, ``body`` is the latin-1 body when at most 4096 bytes (else null), ``client``
  is ``[host, port]``.
- ``stream`` [n=4, size=65536, delay=0, chunked=0]: ``n`` chunks of ``size`` bytes of
  `pattern_block(size)`, ``delay`` seconds before each chunk after the first; Content-Length
  unless ``chunked=1``. Stops, and counts a disconnect, when the client goes away.
- ``sse`` [n=5, interval=0, gate=KEY]: ``text/event-stream``, one event per message, flushed one
  by one: ``id: I\\ndata: event I\\n\\n``. With ``gate=KEY`` event I (I >= 1) is produced only
  after ``/__admin/release?key=KEY`` has been called I times, so a test can prove event 0
  arrived before event 1 exists.
- ``status`` [code=200, retry_after=None]: answers ``code`` with a small JSON body (no body for
  1xx/204/304), and ``Retry-After`` when given.
- ``hang`` [head=0]: never answers until the client disconnects (with ``head=1`` it sends the
  head and a first chunk, then hangs mid-body); counts the disconnect.
- ``slow`` [delay=1]: waits ``delay`` seconds before the head, then answers like ``echo``.
- ``drop`` [size=1000, sent=100, chunked=0]: announces ``Content-Length: size`` (or chunked),
  sends ``sent`` bytes, then breaks the connection without finishing the body.
- ``set-cookie`` [value=V, c=NAME=VALUE ...]: one ``Set-Cookie`` per ``c`` parameter, plus
  ``session=V`` when ``value`` is given, all with ``Path=/``.
- ``cookies``: JSON ``{"cookie": <Cookie header or null>, "cookies": [every Cookie header]}``.
- ``gzip`` [size=20000]: a gzip body of `gzip_payload(size)` with ``Content-Encoding: gzip`` and
  its Content-Length, whatever the request's Accept-Encoding.
- ``upload`` (any method): reads the body chunk by chunk into a hash (bounded memory); JSON
  ``{sha256, length, chunks, max_chunk}``.
- ``headers`` [h=NAME:VALUE ...]: answers 200 with each ``h`` as a response header, in order
  (for hop-by-hop tests: ``h=connection:x-secret&h=x-secret:1&h=keep-alive:timeout=5``).
- ``healthz``: 200 ``{"ok": true}``, or 503 after ``/__admin/health?ok=0``.

Admin (never affected by fail mode)
-----------------------------------
- ``stats``: ``{server, pid, requests: {op: n}, disconnects: {op: n}, in_flight: {op: n},
  completed: {op: n}, total: n}`` (admin requests are not counted).
- ``reset``: zero the counters, turn fail mode off, health on, no delay, clear gates.
- ``fail`` [status=503, retry_after=None, count=None, mode=status|hang|off]: every following
  non-admin request gets ``status`` (or hangs until the client goes, with ``mode=hang``);
  ``count=N`` limits that to the next N requests. ``mode=off`` (or ``status=0``) ends it.
- ``health`` [ok=1|0]: what ``healthz`` answers.
- ``delay`` [seconds=0]: every following non-admin request waits ``seconds`` before it is handled
  (a server that turns slow without failing).
- ``release`` [key=KEY, n=1]: lets ``n`` more gated SSE events of ``KEY`` go.
- ``ping``: 200 ``pong`` (readiness).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, parse_qsl

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

NAME = os.environ.get("UPSTREAM_NAME", "upstream")

OPS = frozenset(
    {
        "echo",
        "stream",
        "sse",
        "status",
        "hang",
        "slow",
        "drop",
        "set-cookie",
        "cookies",
        "gzip",
        "upload",
        "headers",
        "healthz",
    }
)


def pattern_block(size: int) -> bytes:
    """The bytes every ``stream`` chunk of ``size`` bytes carries (deterministic, not constant)."""
    unit = bytes(range(256))
    return (unit * (size // 256 + 1))[:size]


def stream_sha256(n: int, size: int) -> str:
    """The sha256 of a whole ``stream?n=N&size=S`` body."""
    block = pattern_block(size)
    digest = hashlib.sha256()
    for _ in range(n):
        digest.update(block)
    return digest.hexdigest()


def gzip_payload(size: int) -> bytes:
    """The uncompressed text behind ``gzip?size=N``."""
    line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
    return (line * (size // len(line) + 1))[:size]


def gzip_body(size: int) -> bytes:
    """The exact gzip bytes ``gzip?size=N`` sends (mtime 0, so stable)."""
    return gzip.compress(gzip_payload(size), mtime=0)


class State:
    """Per-process counters and switches (one upstream process = one state)."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.disconnects: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.fail_mode: str = "off"  # off | status | hang
        self.fail_status = 503
        self.fail_retry_after: str | None = None
        self.fail_count: int | None = None
        self.healthy = True
        self.delay = 0.0
        self.generation = 0
        self.releases: Counter[str] = Counter()
        self.release_event = asyncio.Event()

    def reset(self) -> None:
        # Requests still running from before the reset must not count in the fresh counters
        # (a leftover decrement would leave `in_flight` at -1).
        self.generation += 1
        self.requests.clear()
        self.disconnects.clear()
        self.in_flight.clear()
        self.completed.clear()
        self.fail_mode = "off"
        self.fail_count = None
        self.fail_retry_after = None
        self.healthy = True
        self.delay = 0.0
        self.releases.clear()
        self.release_event.set()

    def snapshot(self) -> dict[str, Any]:
        return {
            "server": NAME,
            "pid": os.getpid(),
            "requests": dict(self.requests),
            "disconnects": dict(self.disconnects),
            "in_flight": {k: v for k, v in self.in_flight.items() if v},
            "completed": dict(self.completed),
            "total": sum(self.requests.values()),
        }


STATE = State()


def _params(scope: Scope) -> dict[str, list[str]]:
    return parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)


def _param(params: dict[str, list[str]], name: str, default: str) -> str:
    values = params.get(name)
    return values[-1] if values else default


def _op(scope: Scope, params: dict[str, list[str]]) -> str:
    if "op" in params:
        return params["op"][-1]
    segment = scope["path"].rstrip("/").rsplit("/", 1)[-1]
    return segment if segment in OPS else "echo"


def _admin_op(path: str) -> str | None:
    segments = path.split("/")
    if "__admin" not in segments:
        return None
    index = segments.index("__admin")
    return segments[index + 1] if index + 1 < len(segments) else ""


async def _start(send: Send, status: int, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"x-upstream-name", NAME.encode()), *(headers or [])],
        }
    )


async def _json(
    send: Send, data: Any, status: int = 200, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(data).encode()
    await _start(
        send,
        status,
        [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *(headers or []),
        ],
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> tuple[str, int, bytes | None, int, int]:
    """Hash the body as it comes: (sha256, length, small body or None, chunks, max chunk)."""
    digest = hashlib.sha256()
    length = chunks = max_chunk = 0
    small = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            digest.update(chunk)
            length += len(chunk)
            chunks += 1
            max_chunk = max(max_chunk, len(chunk))
            if len(small) <= 4096:
                small += chunk[: 4097 - len(small)]
        if not message.get("more_body", False):
            break
    return digest.hexdigest(), length, bytes(small) if length <= 4096 else None, chunks, max_chunk


class ClientGone(Exception):
    pass


class DisconnectWatch:
    """Notices the client leaving while the app is busy sending (uvicorn's send stays silent)."""

    def __init__(self, receive: Receive) -> None:
        self.gone = asyncio.Event()
        self.finished = False
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not self.finished:
                    self.gone.set()
                return

    def close(self) -> None:
        self.finished = True
        self._task.cancel()


async def admin(op: str, scope: Scope, send: Send) -> None:
    params = _params(scope)
    if op == "stats":
        await _json(send, STATE.snapshot())
    elif op == "reset":
        STATE.reset()
        await _json(send, STATE.snapshot())
    elif op == "fail":
        mode = _param(params, "mode", "status")
        status = int(_param(params, "status", "503"))
        if mode == "off" or status == 0:
            STATE.fail_mode = "off"
            STATE.fail_count = None
        else:
            STATE.fail_mode = mode
            STATE.fail_status = status
            STATE.fail_retry_after = params["retry_after"][-1] if "retry_after" in params else None
            STATE.fail_count = int(params["count"][-1]) if "count" in params else None
        await _json(
            send, {"fail_mode": STATE.fail_mode, "status": STATE.fail_status, "count": STATE.fail_count}
        )
    elif op == "health":
        STATE.healthy = _param(params, "ok", "1") not in ("0", "false", "no")
        await _json(send, {"healthy": STATE.healthy})
    elif op == "delay":
        STATE.delay = float(_param(params, "seconds", "0"))
        await _json(send, {"delay": STATE.delay})
    elif op == "release":
        key = _param(params, "key", "")
        STATE.releases[key] += int(_param(params, "n", "1"))
        STATE.release_event.set()
        await _json(send, {"key": key, "released": STATE.releases[key]})
    elif op == "ping":
        await _start(send, 200, [(b"content-type", b"text/plain"), (b"content-length", b"4")])
        await send({"type": "http.response.body", "body": b"pong"})
    else:
        await _json(send, {"error": f"unknown admin op {op!r}"}, 404)


async def _wait_for_release(key: str, count: int, watch: DisconnectWatch) -> bool:
    """Wait until `key` was released `count` times; False if the client left first."""
    while STATE.releases[key] < count:
        STATE.release_event.clear()
        waiter = asyncio.ensure_future(STATE.release_event.wait())
        gone = asyncio.ensure_future(watch.gone.wait())
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            gone.cancel()
        if watch.gone.is_set():
            return False
    return True


async def _hang_until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    admin_op = _admin_op(scope["path"])
    if admin_op is not None:
        await admin(admin_op, scope, send)
        return

    params = _params(scope)
    op = _op(scope, params)
    STATE.requests[op] += 1
    STATE.in_flight[op] += 1
    generation = STATE.generation
    outcome: Counter[str] | None = None
    try:
        await handle(op, params, scope, receive, send)
    except ClientGone:
        outcome = STATE.disconnects
    else:
        outcome = STATE.completed
    finally:
        if generation == STATE.generation:
            STATE.in_flight[op] -= 1
            if outcome is not None:
                outcome[op] += 1


async def handle(op: str, params: dict[str, list[str]], scope: Scope, receive: Receive, send: Send) -> None:
    if STATE.delay:
        await asyncio.sleep(STATE.delay)
    mode = STATE.fail_mode
    if mode != "off":
        if STATE.fail_count is not None:
            STATE.fail_count -= 1
            if STATE.fail_count <= 0:
                STATE.fail_mode, STATE.fail_count = "off", None
        if mode == "hang":
            await _hang_until_disconnect(receive)
            raise ClientGone
        headers = [(b"retry-after", STATE.fail_retry_after.encode())] if STATE.fail_retry_after else []
        await _read_body(receive)
        await _json(send, {"server": NAME, "error": "fail mode"}, STATE.fail_status, headers)
        return

    if op in ("echo", "slow"):
        if op == "slow":
            await asyncio.sleep(float(_param(params, "delay", "1")))
        sha, length, small, _, _ = await _read_body(receive)
        client = scope.get("client")
        await _json(
            send,
            {
                "server": NAME,
                "op": op,
                "method": scope["method"],
                "path": scope["path"],
                "raw_path": (scope.get("raw_path") or scope["path"].encode()).decode("latin-1"),
                "query_string": scope.get("query_string", b"").decode("latin-1"),
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                "body_sha256": sha,
                "body_length": length,
                "body": small.decode("latin-1") if small is not None else None,
                "client": list(client) if client else None,
                "http_version": scope.get("http_version"),
            },
        )
    elif op == "upload":
        sha, length, _, chunks, max_chunk = await _read_body(receive)
        await _json(
            send, {"server": NAME, "sha256": sha, "length": length, "chunks": chunks, "max_chunk": max_chunk}
        )
    elif op == "stream":
        await _read_body(receive)
        await _stream(params, receive, send)
    elif op == "sse":
        await _read_body(receive)
        await _sse(params, receive, send)
    elif op == "status":
        await _read_body(receive)
        code = int(_param(params, "code", "200"))
        headers = [(b"retry-after", params["retry_after"][-1].encode())] if "retry_after" in params else []
        if code < 200 or code in (204, 304):
            await _start(send, code, headers)
            await send({"type": "http.response.body", "body": b""})
        else:
            await _json(send, {"server": NAME, "status": code}, code, headers)
    elif op == "hang":
        if _param(params, "head", "0") == "1":
            await _read_body(receive)
            await _start(send, 200, [(b"content-type", b"application/octet-stream")])
            await send({"type": "http.response.body", "body": b"x" * 1024, "more_body": True})
        await _hang_until_disconnect(receive)
        raise ClientGone
    elif op == "drop":
        await _read_body(receive)
        size = int(_param(params, "size", "1000"))
        sent = int(_param(params, "sent", "100"))
        headers = [(b"content-type", b"application/octet-stream")]
        if _param(params, "chunked", "0") != "1":
            headers.append((b"content-length", str(size).encode()))
        await _start(send, 200, headers)
        await send({"type": "http.response.body", "body": pattern_block(sent), "more_body": True})
        # Returning without the last body message makes uvicorn close the connection mid-body.
        return
    elif op == "set-cookie":
        await _read_body(receive)
        cookies = list(params.get("c", []))
        if "value" in params:
            cookies.append(f"session={params['value'][-1]}")
        headers = [(b"set-cookie", f"{cookie}; Path=/".encode("latin-1")) for cookie in cookies]
        await _json(send, {"server": NAME, "set": cookies}, 200, headers)
    elif op == "cookies":
        await _read_body(receive)
        values = [v.decode("latin-1") for k, v in scope["headers"] if k == b"cookie"]
        await _json(send, {"server": NAME, "cookie": values[0] if values else None, "cookies": values})
    elif op == "gzip":
        await _read_body(receive)
        body = gzip_body(int(_param(params, "size", "20000")))
        await _start(
            send,
            200,
            [
                (b"content-type", b"text/plain"),
                (b"content-encoding", b"gzip"),
                (b"content-length", str(len(body)).encode()),
            ],
        )
        await send({"type": "http.response.body", "body": body})
    elif op == "headers":
        await _read_body(receive)
        pairs = [v.split(":", 1) for k, v in parse_qsl(scope["query_string"].decode("latin-1")) if k == "h"]
        headers = [(k.strip().lower().encode("latin-1"), v.strip().encode("latin-1")) for k, v in pairs]
        body = json.dumps({"server": NAME, "sent": [[k.decode(), v.decode()] for k, v in headers]}).encode()
        await _start(send, 200, [*headers, (b"content-length", str(len(body)).encode())])
        await send({"type": "http.response.body", "body": body})
    elif op == "healthz":
        await _read_body(receive)
        await _json(send, {"ok": STATE.healthy, "server": NAME}, 200 if STATE.healthy else 503)
    else:  # pragma: no cover - _op only returns known ops
        await _json(send, {"error": "unknown op"}, 404)


async def _stream(params: dict[str, list[str]], receive: Receive, send: Send) -> None:
    n = int(_param(params, "n", "4"))
    size = int(_param(params, "size", "65536"))
    delay = float(_param(params, "delay", "0"))
    headers = [(b"content-type", b"application/octet-stream")]
    if _param(params, "chunked", "0") != "1":
        headers.append((b"content-length", str(n * size).encode()))
    block = pattern_block(size)
    watch = DisconnectWatch(receive)
    try:
        await _start(send, 200, headers)
        for i in range(n):
            if i and delay:
                try:
                    await asyncio.wait_for(watch.gone.wait(), delay)
                except TimeoutError:
                    pass
            if watch.gone.is_set():
                raise ClientGone
            await send({"type": "http.response.body", "body": block, "more_body": True})
        if watch.gone.is_set():
            raise ClientGone
        await send({"type": "http.response.body", "body": b""})
    finally:
        watch.close()


async def _sse(params: dict[str, list[str]], receive: Receive, send: Send) -> None:
    n = int(_param(params, "n", "5"))
    interval = float(_param(params, "interval", "0"))
    gate = params["gate"][-1] if "gate" in params else None
    watch = DisconnectWatch(receive)
    try:
        await _start(send, 200, [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")])
        for i in range(n):
            if i and gate is not None and not await _wait_for_release(gate, i, watch):
                raise ClientGone
            if i and interval:
                try:
                    await asyncio.wait_for(watch.gone.wait(), interval)
                except TimeoutError:
                    pass
            if watch.gone.is_set():
                raise ClientGone
            await send(
                {
                    "type": "http.response.body",
                    "body": f"id: {i}\ndata: event {i}\n\n".encode(),
                    "more_body": True,
                }
            )
        await send({"type": "http.response.body", "body": b""})
    finally:
        watch.close()


def main(argv: list[str] | None = None) -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="the asgi_gateway test upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
