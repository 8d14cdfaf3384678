"""`GatewayMiddleware` in a FastAPI app: on top of the host's middleware stack once started,
where that loses nothing, and the heap frozen after start-up. Over real sockets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from servers import HOST, Upstreams, free_port, http_client, serve_app, wait_until
from starlette.middleware.errors import ServerErrorMiddleware

from asgi_gateway import Gateway, GatewayMiddleware


def config(upstreams: Upstreams) -> dict[str, Any]:
    return {
        "routes": [{"path": "/api", "upstream": "users"}],
        "upstreams": {"users": {"servers": [{"url": upstreams.u1.url}]}},
        "status_path": "/-/status",
    }


def host_app(upstreams: Upstreams, **fastapi_options: Any) -> FastAPI:
    app = FastAPI(**fastapi_options)

    @app.get("/own")
    async def own() -> dict[str, bool]:
        return {"own": True}

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("the host app's own bug")

    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"handled_by": "host"}, status_code=500)

    app.add_exception_handler(500, on_error)
    app.add_middleware(GatewayMiddleware, config=config(upstreams))
    return app


def served_first(app: Any) -> Gateway | None:
    """The gateway the host calls first, ahead of its own `__call__` and stack, if any."""
    gateway = getattr(type(app), "_gateway_first", None)
    if gateway is None:
        return None
    assert isinstance(gateway, Gateway)
    # Calling the app calls the gateway; the gateway's `app` is the host's own call.
    assert type(app).__call__ == gateway.__call__
    assert gateway.app == FastAPI.__call__.__get__(app, FastAPI)
    return gateway


def test_proxied_requests_skip_the_host_stack_and_the_rest_still_pass_it(upstreams: Upstreams) -> None:
    app = host_app(upstreams)
    assert type(app) is FastAPI
    with serve_app(app) as base, http_client(base) as client:
        # Started: the app calls the gateway first, FastAPI's own call and whole stack below it.
        assert served_first(app) is not None
        assert isinstance(app, FastAPI)
        assert type(app).__name__ == "FastAPI"
        assert isinstance(app.middleware_stack, ServerErrorMiddleware)
        answer = client.get("/api/users/7")
        assert answer.status_code == 200
        assert answer.json()["raw_path"] == "/api/users/7"
        assert client.get("/-/status").json()["upstreams"]["users"]["servers"][0]["state"] == "healthy"
        # Unmatched requests reach the app through every layer: its routes, its 404, and its
        # 500 handler (ServerErrorMiddleware's) for its own errors.
        assert client.get("/own").json() == {"own": True}
        assert client.get("/nowhere").status_code == 404
        broken = client.get("/broken")
        assert broken.status_code == 500
        assert broken.json() == {"handled_by": "host"}


def test_a_host_whose_own_call_adds_something_keeps_it_for_proxied_requests(
    upstreams: Upstreams,
) -> None:
    """With a `root_path`, or FastAPI's native telemetry on, the gateway goes on top of the
    host's stack only: the host's own call still runs first, and FastAPI still spans every
    proxied request."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traced = host_app(upstreams, telemetry={"tracer_provider": provider, "metrics": False, "logs": False})
    rooted = host_app(upstreams)
    rooted.root_path = "/prefix"  # as FastAPI(root_path=...), which warns it is deprecated
    for app in (traced, rooted):
        with serve_app(app) as base, http_client(base) as client:
            assert served_first(app) is None
            assert type(app) is FastAPI
            assert isinstance(app.middleware_stack, Gateway)
            assert client.get("/api/users/7").status_code == 200
            assert client.get("/own").json() == {"own": True}
    names = [span.name for span in exporter.get_finished_spans()]
    assert names.count("GET") + sum(name.startswith("GET /") for name in names) >= 2, names


def test_a_middleware_added_after_the_gateway_still_sees_proxied_requests(upstreams: Upstreams) -> None:
    app = host_app(upstreams)

    @app.middleware("http")
    async def stamp(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["x-host-middleware"] = "1"
        return response

    with serve_app(app) as base, http_client(base) as client:
        assert not isinstance(app.middleware_stack, Gateway)
        assert served_first(app) is None
        answer = client.get("/api/users/7")
        assert answer.status_code == 200
        assert answer.headers["x-host-middleware"] == "1"
        assert client.get("/own").headers["x-host-middleware"] == "1"


def test_the_apps_body_limit_still_applies_to_proxied_requests(upstreams: Upstreams) -> None:
    app = host_app(upstreams, max_body_size=100)
    with serve_app(app) as base, http_client(base) as client:
        assert not isinstance(app.middleware_stack, Gateway)
        assert served_first(app) is None
        assert client.post("/api/users", content=b"x" * 50).status_code == 200
        assert client.post("/api/users", content=b"x" * 1000).status_code == 413


def test_websockets_and_the_lifespan_after_hoisting(upstreams: Upstreams) -> None:
    """Unmatched WebSocket handshakes reach the app (its 403), and shutdown completes."""
    import websockets.sync.client

    app = host_app(upstreams)
    with serve_app(app) as base:
        assert served_first(app) is not None
        url = base.replace("http://", "ws://") + "/no-such-socket"
        try:
            with websockets.sync.client.connect(url, open_timeout=5):
                raise AssertionError("the handshake was accepted")
        except websockets.exceptions.InvalidStatus as exc:
            assert exc.response.status_code == 403


_FROZEN_APP = """
import gc
from fastapi import FastAPI
from asgi_gateway import GatewayMiddleware

{before}
app = FastAPI()

@app.get("/frozen")
async def frozen() -> dict[str, int]:
    return {{"frozen": gc.get_freeze_count()}}

app.add_middleware(GatewayMiddleware, config={{"routes": [{{"path": "/api", "upstream": "u"}}],
                   "upstreams": {{"u": {{"servers": [{{"url": "{upstream}"}}]}}}}}})
"""


def frozen_after_start(tmp_path: Path, upstream: str, before: str = "") -> int:
    (tmp_path / "frozen_app.py").write_text(_FROZEN_APP.format(before=before, upstream=upstream))
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--app-dir", str(tmp_path), "frozen_app:app",
               "--host", HOST, "--port", str(port), "--log-level", "warning"]  # fmt: skip
    log = tmp_path / "uvicorn.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        with http_client(f"http://{HOST}:{port}", timeout=2) as client:

            def answering() -> bool:
                assert process.poll() is None, log.read_text()
                try:
                    return client.get("/frozen").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(answering, timeout=30)
            return int(client.get("/frozen").json()["frozen"])
    finally:
        process.terminate()
        process.wait(10)


def test_the_heap_is_frozen_once_the_host_started(tmp_path: Path, upstreams: Upstreams) -> None:
    # A process of its own: the test run's heap stays as it is.
    assert frozen_after_start(tmp_path, upstreams.u1.url) > 1000


def test_a_host_that_runs_the_collector_itself_is_left_alone(tmp_path: Path, upstreams: Upstreams) -> None:
    assert frozen_after_start(tmp_path, upstreams.u1.url, before="gc.disable()") == 0
