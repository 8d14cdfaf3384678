"""Fixtures of the transport tests.

- `anyio_backend`: plain asyncio and uvloop, the loops the built-in client runs on.
- `transport`: a `PoolTransport`, closed after the test.
- `uvicorn_server` (module): a uvicorn upstream in a thread, running `transport_tools.upstream_app`.
- `certificate` (module): a self-signed certificate and key for 127.0.0.1.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import serve_app
from transports.transport_tools import HOST, make_server, upstream_app

from asgi_gateway._transports.pool import PoolTransport
from asgi_gateway._types import Server


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """The pool runs wherever uvicorn does: plain asyncio, and uvloop (uvicorn's default)."""
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def uvicorn_server() -> Iterator[Server]:
    with serve_app(upstream_app, lifespan="off", http="httptools") as url:
        yield make_server(int(url.rsplit(":", 1)[1]))


@pytest.fixture
async def transport() -> AsyncIterator[PoolTransport]:
    async with PoolTransport() as pool:
        yield pool


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the TLS tests need the openssl command"
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
