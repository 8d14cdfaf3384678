"""Shared fixtures: real upstream processes and real gateways on 127.0.0.1.

- `upstreams` (session): three `UpstreamProcess`es named u1, u2, u3. Before each test that uses
  them they are made running again (continued / restarted) and reset (counters, fail mode,
  health), so no test inherits another's damage.
- `upstream_factory` (function): start extra upstreams a test may kill; all closed afterwards.
- `gateway_factory(config, **kwargs) -> base_url`: a Starlette host app with its own routes
  (`/local`, and a catch-all answering `{"host_app": true, ...}`) wrapped by
  `GatewayMiddleware(config=config, **kwargs)`, served by uvicorn in a thread.
- `standalone_gateway_factory(config, **kwargs) -> base_url`: `Gateway(config, **kwargs)` served alone.
- `serve`: `serve(app, **uvicorn_kwargs) -> base_url` for any ASGI app, stopped after the test.
- `anyio_backend`: asyncio by default; test modules that claim trio parametrize their own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Upstreams lives in servers.py: test modules import it from there (a `conftest` module name is
# ambiguous once several test folders have one); it stays importable from here too.
from servers import (
    FileGateway,
    UpstreamProcess,
    Upstreams,
    make_host_app,
    serve_app,
    start_upstreams,
    transport_kwargs,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def upstreams() -> Iterator[Upstreams]:
    processes = start_upstreams("u1", "u2", "u3")
    try:
        yield Upstreams(*processes)
    finally:
        for process in processes:
            process.close()


@pytest.fixture(autouse=True)
def _fresh_upstreams(request: pytest.FixtureRequest) -> None:
    # Only for tests that asked for the session upstreams: others must not pay for them.
    if "upstreams" in request.fixturenames:
        request.getfixturevalue("upstreams").reset()


@pytest.fixture
def upstream_factory() -> Iterator[Callable[..., UpstreamProcess]]:
    """`upstream_factory(name="x", port=None) -> UpstreamProcess`, started and ready."""
    started: list[UpstreamProcess] = []

    def factory(name: str = "extra", port: int | None = None) -> UpstreamProcess:
        upstream = UpstreamProcess(name, port)
        started.append(upstream)
        return upstream.start()

    try:
        yield factory
    finally:
        for upstream in started:
            upstream.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """`serve(app, **uvicorn_kwargs) -> base_url`; every server is stopped after the test."""
    with contextlib.ExitStack() as stack:

        def factory(app: Any, **uvicorn_kwargs: Any) -> str:
            return stack.enter_context(serve_app(app, **uvicorn_kwargs))

        yield factory


# The proxy behaviour suite runs over every built-in transport: the fast pool is held
# to the same behaviour as the httpx adapter.
TRANSPORT_SUITE = frozenset({"test_proxy", "test_headers", "test_streaming", "test_errors"})


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "transport_kind" in metafunc.fixturenames and module in TRANSPORT_SUITE:
        metafunc.parametrize("transport_kind", ["pool", "httpx"], indirect=True, scope="module")


@pytest.fixture(scope="module")
def transport_kind(request: pytest.FixtureRequest) -> str:
    """Which built-in transport the gateways of this test use: "pool" (the default) or "httpx"."""
    return str(getattr(request, "param", "pool"))


def _with_transport(kwargs: dict[str, Any], transport_kind: str) -> dict[str, Any]:
    return {**transport_kwargs(transport_kind), **kwargs}


@pytest.fixture
def gateway_factory(serve: Callable[..., str], transport_kind: str) -> Callable[..., str]:
    """`gateway_factory(config, **GatewayMiddleware_kwargs) -> base_url` of a host app behind it."""

    def factory(config: Any, **kwargs: Any) -> str:
        return serve(make_host_app(config, **_with_transport(kwargs, transport_kind)))

    return factory


@pytest.fixture
def standalone_gateway_factory(serve: Callable[..., str], transport_kind: str) -> Callable[..., str]:
    """`standalone_gateway_factory(config, **Gateway_kwargs) -> base_url` of a bare `Gateway`."""

    def factory(config: Any, **kwargs: Any) -> str:
        from asgi_gateway import Gateway

        return serve(Gateway(config, **_with_transport(kwargs, transport_kind)))

    return factory


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., FileGateway]]:
    """`served(config, **gateway_kwargs) -> FileGateway`, started; stopped after the test."""
    started: list[FileGateway] = []

    def factory(cfg: dict[str, Any], **kwargs: Any) -> FileGateway:
        served = FileGateway(tmp_path / "gateway.json", cfg, **kwargs)
        served.server.start()
        started.append(served)
        return served

    try:
        yield factory
    finally:
        for served in started:
            served.server.stop()
