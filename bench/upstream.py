"""A small pure-Python HTTP/1.1 upstream: the slow upstream, and nginx's stand-in where nginx is missing.

    python bench/upstream.py --port 8001 [--port 8002 ...]

Paths (GET/HEAD, keep-alive):
    /1k        1 KiB body            /1m        1 MiB body
    /healthz   "ok"                  /slow...   held until /release, then "ok"
    /count     how many /slow requests are held now
    /release   answers every held /slow request, and later ones at once
    /hold      holds /slow requests again

It parses only what the bench sends (request heads, Content-Length bodies), on asyncio
protocols (uvloop when installed) so it stays cheap next to the proxies it feeds.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import cast

KIB_BODY = b"x" * 1024
MIB_BODY = b"y" * (1 << 20)
_CHUNK = 1 << 16


def _head(status: bytes, length: int) -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % (status, length)


_KIB_RESPONSE = _head(b"200 OK", len(KIB_BODY)) + KIB_BODY
_MIB_HEAD = _head(b"200 OK", len(MIB_BODY))
_OK = _head(b"200 OK", 2) + b"ok"
_NOT_FOUND = _head(b"404 Not Found", 9) + b"not found"


class _State:
    def __init__(self) -> None:
        self.held: list[_Connection] = []
        self.holding = True


class _Connection(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.skip = 0
        self.holding = False
        self.pending_head = False
        self.writable: asyncio.Event = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.state.held:
            self.state.held.remove(self)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._process()

    def _process(self) -> None:
        while not self.holding:
            if self.skip:
                dropped = min(self.skip, len(self.buffer))
                self.buffer = self.buffer[dropped:]
                self.skip -= dropped
                if self.skip:
                    return
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            lines = head.split(b"\r\n")
            method, _, rest = lines[0].partition(b" ")
            path = rest.partition(b" ")[0].partition(b"?")[0]
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.skip = int(value.strip())
            self._respond(method, path)

    def _respond(self, method: bytes, path: bytes) -> None:
        transport = self.transport
        assert transport is not None
        head_only = method == b"HEAD"
        if path == b"/1k":
            transport.write(_KIB_RESPONSE[: -len(KIB_BODY)] if head_only else _KIB_RESPONSE)
        elif path == b"/1m":
            transport.write(_MIB_HEAD)
            if not head_only:
                asyncio.get_running_loop().create_task(self._send_mib())
                # Later requests on this connection wait until the body is out.
                self.holding = True
        elif path.startswith(b"/slow") and not self.state.holding:
            transport.write(_OK[:-2] if head_only else _OK)
        elif path.startswith(b"/slow"):
            self.holding = True
            self.pending_head = head_only
            self.state.held.append(self)
        elif path == b"/count":
            body = b"%d" % len(self.state.held)
            transport.write(_head(b"200 OK", len(body)) + body)
        elif path == b"/hold":
            self.state.holding = True
            transport.write(_OK)
        elif path == b"/release":
            self.state.holding = False
            held, self.state.held = self.state.held, []
            for connection in held:
                connection.release()
            transport.write(_OK)
        elif path == b"/healthz":
            transport.write(_OK)
        else:
            transport.write(_NOT_FOUND)

    async def _send_mib(self) -> None:
        transport = self.transport
        assert transport is not None
        view = memoryview(MIB_BODY)
        for start in range(0, len(MIB_BODY), _CHUNK):
            await self.writable.wait()
            if transport.is_closing():
                return
            transport.write(view[start : start + _CHUNK])
        self.holding = False
        self._process()

    def release(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_OK[:-2] if self.pending_head else _OK)
        self.holding = False
        self._process()


async def serve(ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    state = _State()
    servers = [
        await loop.create_server(lambda: _Connection(state), "127.0.0.1", port, backlog=4096)
        for port in ports
    ]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, action="append", required=True)
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port))
    else:
        uvloop.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
