"""The gateway inside a host app: where `GatewayMiddleware` sits, and the heap after start-up.

`app.add_middleware(GatewayMiddleware, ...)` puts the gateway inside the host's middleware
stack: a proxied request first passes Starlette's `ServerErrorMiddleware` (which wraps
every `send`) and, on FastAPI, its exception-telemetry and body-limit layers. For the
gateway's requests they do nothing: the gateway answers its own errors and lets no
exception out, and those layers act only on an exception. So once the host has started,
`hoist` puts the gateway on top of the stack when every layer above it is one of those,
as built (a body limit set on the app, or any middleware of the user's added after the
gateway's, keeps it where it is). The gateway then hands the requests no route matches
to the whole stack, as before: they pass every layer, the gateway's middleware included,
which lets them through.

Above the stack, `FastAPI.__call__` and `Starlette.__call__` still run for every request:
they set `scope["app"]` and `root_path`, and FastAPI's checks whether its native telemetry
is on (three provider look-ups, each an `os.environ` miss raising `KeyError`: about a
tenth of a proxied request's instructions). Where the host's own call adds nothing to a
proxied request (no `root_path`, FastAPI's telemetry off when the host started), the host
object itself is made to call the gateway first: its class becomes a subclass of its own
whose `__call__` is the gateway's, and the gateway's `app` is the host's original call, so
what no route matches runs exactly as before, telemetry included. The host stays an
instance of its class in every other respect.

`freeze_heap`: what exists once the host has started lives as long as the process; kept
out of the collector's generations, it is not scanned again by every full collection, the
pauses that otherwise show in the tail latency (`asgi-gateway serve` does the same).
"""

from __future__ import annotations

import gc
import threading
from typing import Any, Final

__all__ = ["freeze_heap", "hoist", "refreeze_heap"]

#: Host layers that act only on an exception escaping the app below them, as
#: (module, qualified name) of their exact types: nothing is imported for them.
_TRANSPARENT: Final = frozenset(
    {
        ("starlette.middleware.errors", "ServerErrorMiddleware"),
        ("fastapi.telemetry._asgi", "ExceptionTelemetryMiddleware"),
        # With the app's max_body_size unset; set, its `app` is a body limiter, not transparent.
        ("fastapi._body_limit", "AppBodyLimitMiddleware"),
    }
)

#: Layers looked through at most, above the gateway's middleware.
_MAX_DEPTH: Final = 16


#: The hosts' own calls that add nothing to a proxied request but `scope["app"]`, a
#: `root_path` and FastAPI's telemetry check, as (module, qualified name).
_PLAIN_CALLS: Final = frozenset(
    {("starlette.applications", "Starlette.__call__"), ("fastapi.applications", "FastAPI.__call__")}
)


def hoist(host: Any, middleware: object, gateway: Any) -> bool:
    """Serve `gateway` ahead of `host`'s middleware stack when only transparent layers
    are above `middleware` (the `GatewayMiddleware` in it); True when it was moved.

    Ahead of the host's own call where that is safe (`_serve_first`), else on top of its
    stack; either way what no route matches still passes every layer.
    """
    if getattr(type(host), "_gateway_first", None) is gateway:
        return True  # a second start-up of the same host
    stack = getattr(host, "middleware_stack", None)
    layer = stack
    for _ in range(_MAX_DEPTH):
        if layer is middleware:
            break
        kind = type(layer)
        if (kind.__module__, kind.__qualname__) not in _TRANSPARENT:
            return False
        layer = getattr(layer, "app", None)
    else:
        return False
    if stack is middleware:
        return False
    if not _serve_first(host, gateway):
        gateway.app = stack
        host.middleware_stack = gateway
    return True


def _serve_first(host: Any, gateway: Any) -> bool:
    """Make calling `host` call `gateway` first, with the host's own call as its `app`."""
    kind = type(host)
    call = kind.__call__
    if (getattr(call, "__module__", None), getattr(call, "__qualname__", None)) not in _PLAIN_CALLS:
        return False
    if getattr(host, "root_path", ""):
        return False
    # FastAPI's native telemetry (when it has one) spans every request it sees: with it on,
    # the proxied requests keep going through it.
    telemetry = getattr(host, "_native_telemetry", None)
    if telemetry is not None and telemetry.enabled():
        return False
    gateway.app = call.__get__(host, kind)
    # A bound method as the class's `__call__` is called as it is, without the host as its
    # first argument: calling the host is calling the gateway, with no frame in between.
    first = {"__call__": gateway.__call__, "_gateway_first": gateway, "__slots__": ()}
    first.update(__module__=kind.__module__, __qualname__=kind.__qualname__)
    host.__class__ = type(kind.__name__, (kind,), first)
    return True


#: Whether this process's heap was frozen here (and so is re-frozen after a reload).
_frozen_here = False


def freeze_heap() -> None:
    """Once the host has started: move what is alive out of the collector's generations.

    A host that manages the collector itself (`gc.disable()`, or a `gc.freeze()` of its
    own, as `asgi-gateway serve` does) is left alone, and so is an app started off the main
    thread: servers run apps in it, test clients (Starlette's `TestClient`, a server in a
    thread) do not, and a test run's heap is not the gateway's to freeze (`gc.get_referrers`
    no longer sees frozen objects).
    """
    global _frozen_here
    if (
        not gc.isenabled()
        or gc.get_freeze_count()
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    gc.collect()
    gc.freeze()
    _frozen_here = True


def refreeze_heap() -> None:
    """After a reload: let a collection see the replaced config's objects, then freeze again.

    Without it the old state's reference cycles would stay frozen, and so uncollected.
    """
    if _frozen_here and gc.isenabled():
        gc.unfreeze()
        gc.collect()
        gc.freeze()
