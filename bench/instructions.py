"""Instructions per request, counted by valgrind (deterministic, unlike time on a shared machine).

    python bench/instructions.py                       # every set-up below, tracing off
    python bench/instructions.py --setup fastapi --tracing sampled
    python bench/instructions.py --layers              # the new layers' cost on routes without them
    python bench/instructions.py --tree /tmp/gw-old    # the same driver against another checkout
    python bench/instructions.py --setup fastapi --tracing all --sdk-patch none --sdk-patch all
                                                       # with the SDK change of apps/sdk_patch.py

Each figure is valgrind's (`--tool=callgrind`) instruction count of a whole process driving
2N requests minus that of one driving N, divided by N: start-up, imports and the first
requests' warm-up cancel out. The driver is `bench/hotpath.py`'s: a fake ASGI receive/send
call the app directly, one request after another, and the transport returns a 1 KiB
response at once, as the built-in client does when a whole response arrived with its head.
The app is started and stopped through the ASGI lifespan, as uvicorn does.

Set-ups (`--setup`):
    standalone        the `Gateway` itself as the ASGI app
    starlette         `Starlette()` with `app.add_middleware(GatewayMiddleware, ...)`
    fastapi           `FastAPI()` with `app.add_middleware(GatewayMiddleware, ...)`
    fastapi-inner     as fastapi, with a user middleware added after the gateway's, so
                      the gateway stays where Starlette puts it (inside the host's stack)
    fastapi-front     `GatewayMiddleware(FastAPI(), ...)` served in front of the app

`--layers` compares a config with a second route and upstream that use none of the newer
layers with the same config where they use all of them (hedge, adaptive_concurrency, DNS
discovery, rate limit, auth, ip rules, transformation; and the admin page): the measured
route's requests must cost the same in both. With `--calls`, each layer alone, by calls.

Traced runs (`--tracing sampled|all|sdk`) drop each span as it ends, in the request's thread,
so that no export thread's wake-ups (on wall time) vary the counts; `BENCH_SPAN_PROCESSOR=batch`
ends them through a `BatchSpanProcessor` instead, as bench/run.py's apps do (its counts then
vary by several percent).

Without valgrind (`--no-valgrind`) the driver runs once and prints CPU µs per request instead
(noisy on a shared machine); `--calls` counts function calls per request (cProfile).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fixed_clock() -> None:
    """Let the clock advance a fixed step per reading, so that every run sees the same time.

    The gateway's coarse timers and disconnect watch, the retry deadlines and the event
    loop read `time.monotonic`: on the wall clock a run slowed by a busy machine (or by
    valgrind itself) takes other paths and counts differ between runs of the same code.
    """
    now = [1000.0]

    def tick() -> float:
        now[0] += 1e-6
        return now[0]

    time.monotonic = tick
    time.perf_counter = tick


# Before anything imports asgi_gateway: its clocks are bound as default arguments.
if __name__ == "__main__" and "--child" in sys.argv:
    fixed_clock()

import hotpath  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent / "apps"))
from sdk_spans import ClientSpans, server_spans  # noqa: E402

BENCH = Path(__file__).resolve().parent
SETUPS = ("standalone", "starlette", "fastapi", "fastapi-inner", "fastapi-front")
TRACING = ("off", "unsampled", "sampled", "all", "sdk")

# The request, the upstream's answer and the instant transport are hotpath.py's (the same
# driver); the scope says ASGI 2.4 and has a `state`, as uvicorn's does for a host's lifespan.
_SCOPE: dict[str, Any] = {**hotpath._SCOPE, "asgi": {"version": "3.0", "spec_version": "2.4"}, "state": {}}


#: What `--layers` configures on a second route and upstream, one at a time and all at once.
LAYERS: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    # name: (the upstream's keys, the route's keys, top-level keys)
    "hedge": ({"hedge": {"delay": 0.05}}, {}, {}),
    "adaptive_concurrency": ({"adaptive_concurrency": {}}, {}, {}),
    "discovery": ({"discovery": {"type": "dns", "interval": 3600.0}}, {}, {}),
    "rate_limit": ({}, {"rate_limit": {"rate": 1000, "per": 1.0}}, {}),
    "auth": ({}, {"auth": {"jwt": {"secret": "s" * 32, "algorithms": ["HS256"]}}}, {}),
    "ip_rules": ({}, {"allow_ips": ["127.0.0.0/8"], "deny_ips": ["127.0.0.9"]}, {}),
    "transform": (
        {},
        {
            "request_headers": {"set": {"x-edge": "1"}},
            "response_headers": {"remove": ["server"]},
            "rewrite": {"pattern": "^/edge/(.*)$", "replacement": "/\\1"},
        },
        {},
    ),
    "admin": ({}, {}, {"admin": {"path": "/-/admin"}}),
}
#: The measured route itself with three header rules and a rewrite (`--config transform`,
#: against `plain`: the transformation's own cost).
TRANSFORM: dict[str, Any] = {
    "request_headers": {"set": {"x-edge": "1"}, "add": {"x-via": "gateway"}},
    "response_headers": {"remove": ["server"]},
    "rewrite": {"pattern": "^/(.*)$", "replacement": "/v2/$1"},
}
CONFIGS = ("plain", "layers:none", "layers", *(f"layers:{name}" for name in LAYERS), "transform")


def config(kind: str) -> dict[str, Any]:
    """The bench's config (bench/apps/gateway_app.py's layers) and, for "layers", a second
    route and upstream with every layer of `LAYERS` ("layers:NAME": with that one only)."""
    servers = [{"url": f"http://127.0.0.1:{port}"} for port in (9001, 9002, 9003)]
    upstreams: dict[str, Any] = {
        "backend": {
            "servers": servers,
            "balancer": "round_robin",
            "health_check": {"path": "/healthz", "interval": 3600.0},
            "outlier_detection": {"consecutive_failures": 5},
            "retry": {"attempts": 3},
            "max_concurrent_requests": 4000,
        }
    }
    routes: list[dict[str, Any]] = [
        {"path": "/", "upstream": "backend", **(TRANSFORM if kind == "transform" else {})}
    ]
    result: dict[str, Any] = {"routes": routes, "upstreams": upstreams}
    if kind.startswith("layers"):
        one = kind.partition(":")[2]
        names = list(LAYERS) if kind == "layers" else [] if one == "none" else [one]
        upstream: dict[str, Any] = {"servers": [{"url": "http://localhost:9004"}], "retry": {"attempts": 2}}
        route: dict[str, Any] = {"path": "/edge", "upstream": "edge"}
        for name in names:
            upstream_keys, route_keys, top_keys = LAYERS[name]
            upstream.update(upstream_keys)
            route.update(route_keys)
            result.update(top_keys)
        upstreams["edge"] = upstream
        # First, so that every request of the measured route is matched past it.
        routes.insert(0, route)
    return result


def _ids() -> Any:
    """The same ids in every run, whatever else draws from `random`: the same requests sampled."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator

    class Ids(IdGenerator):
        def __init__(self) -> None:
            self.count = 0

        def generate_span_id(self) -> int:
            self.count += 1
            return (self.count * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF or 1

        def generate_trace_id(self) -> int:
            self.count += 1
            return (self.count << 64) | ((self.count * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)

        def is_trace_id_random(self) -> bool:
            return True

    return Ids()


def _tracer_provider(level: str) -> Any:
    from opentelemetry import trace

    if level == "off":
        return trace.NoOpTracerProvider()
    if level == "sdk":
        level = "all"
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SimpleSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = {"unsampled": ALWAYS_OFF, "sampled": ParentBased(TraceIdRatioBased(0.1)), "all": ALWAYS_ON}[
        level
    ]
    provider = TracerProvider(sampler=sampler, id_generator=_ids())
    if os.environ.get("BENCH_SPAN_PROCESSOR") == "batch":
        # As in bench/run.py's apps: batches of 512, dropped by the exporter in the SDK's thread.
        provider.add_span_processor(BatchSpanProcessor(Discard()))
    else:
        # Each span dropped as it ends, in the request's thread: no export thread whose
        # wake-ups (every 5 s of wall time, which valgrind stretches) vary the counts.
        provider.add_span_processor(SimpleSpanProcessor(Discard()))
    return provider


def build(setup: str, tracing: str, kind: str) -> Any:
    from opentelemetry.metrics import NoOpMeterProvider

    from asgi_gateway import Gateway, GatewayMiddleware

    options: dict[str, Any] = {
        "transport": hotpath._Instant(),
        "tracer_provider": _tracer_provider(tracing),
        "meter_provider": NoOpMeterProvider(),
    }
    if tracing == "sdk":
        from opentelemetry import trace

        tracer = options["tracer_provider"].get_tracer("bench")
        options["tracer_provider"] = trace.NoOpTracerProvider()
        options["transport"] = ClientSpans(options["transport"], tracer)
        if setup != "standalone":
            raise SystemExit("bench: --tracing sdk is for --setup standalone")
        return server_spans(Gateway(config(kind), **options), tracer)
    if setup == "standalone":
        return Gateway(config(kind), **options)
    if setup == "starlette":
        from starlette.applications import Starlette

        host: Any = Starlette()
    else:
        from fastapi import FastAPI

        host = FastAPI()
    if setup == "fastapi-front":
        return GatewayMiddleware(host, config=config(kind), **options)
    host.add_middleware(GatewayMiddleware, config=config(kind), **options)
    if setup == "fastapi-inner":

        class Outer:
            def __init__(self, app: Any) -> None:
                self.app = app

            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                await self.app(scope, receive, send)

        host.add_middleware(Outer)
    return host


class _Receive:
    """A request's receive(): its (empty) body, then, as a server's does, a wait for the
    disconnect, which never comes. (Answering at once instead would make the gateway's
    disconnect watch, started when a request outlasts 50 ms, busy: under valgrind some do.)"""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False

    async def __call__(self) -> dict[str, Any]:
        if self.sent:
            await asyncio.get_running_loop().create_future()
        self.sent = True
        return hotpath._REQUEST_MESSAGE


async def drive(app: Any, requests: int) -> float:
    """Start `app` through the lifespan, send it `requests` requests, stop it: CPU s per request."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.ensure_future(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, outbox.put)
    )
    await inbox.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(outbox.get(), 30)
    assert started["type"] == "lifespan.startup.complete", started

    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    begin = time.process_time()
    for _ in range(requests):
        await app({**_SCOPE, "state": {}}, _Receive(), send)
    spent = time.process_time() - begin
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(outbox.get(), 30)
    await asyncio.wait_for(lifespan, 30)
    if statuses != [200] * requests:
        raise SystemExit(f"bench: the gateway answered {sorted(set(statuses))}, not only 200")
    return spent / requests


def run_once(setup: str, tracing: str, kind: str, requests: int, sdk_patch: str = "") -> float:
    if sdk_patch and sdk_patch != "none":
        import sdk_patch as patch

        patch.apply(sdk_patch)
    # The same trace ids (and so the same sampling decisions) in every run.
    random.seed(20)
    return asyncio.run(drive(build(setup, tracing, kind), requests))


def _profile(setup: str, tracing: str, kind: str, requests: int) -> dict[Any, Any]:
    """cProfile's table of one run: (file, line, name) -> (calls, ...)."""
    import cProfile
    import pstats

    app = build(setup, tracing, kind)
    random.seed(20)
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(drive(app, requests))
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    return stats  # type: ignore[no-any-return]


def call_counts(setup: str, tracing: str, kind: str, requests: int) -> dict[str, float]:
    """Calls per request of each function (cProfile: deterministic counts)."""
    stats = _profile(setup, tracing, kind, requests)
    out: dict[str, float] = {}
    for (filename, line, name), (_, ncalls, *_rest) in stats.items():
        where = filename.split("site-packages/")[-1].split("/work/main/")[-1]
        out[f"{name} ({where}:{line})"] = ncalls / requests
    return out


def layers_calls(setup: str, tracing: str, requests: int) -> str:
    """Per `--layers` config: the calls per request added on the route that uses none of them."""
    plain = call_counts(setup, tracing, "plain", requests)
    base = call_counts(setup, tracing, "layers:none", requests)
    lines = [
        f"calls per request on the measured route, {setup}, tracing {tracing}: {sum(plain.values()):.1f} "
        f"alone, {sum(base.values()):.1f} beside a second route and upstream without layers; with "
        "these on the second one:"
    ]
    for kind in CONFIGS[2:-1]:
        counts = call_counts(setup, tracing, kind, requests)
        added = sorted(
            ((counts.get(k, 0.0) - base.get(k, 0.0), k) for k in set(counts) | set(base)), reverse=True
        )
        extra = sum(counts.values()) - sum(base.values())
        most = ", ".join(f"{name} {per:+.1f}" for per, name in added[:3] if per >= 0.5)
        lines.append(f"  {kind:<28} {extra:+6.1f}" + (f"  ({most})" if most else ""))
    return "\n".join(lines)


def calls(setup: str, tracing: str, kind: str, requests: int, top: int) -> str:
    """Function calls per request by package, and the OpenTelemetry functions called most."""
    stats = _profile(setup, tracing, kind, requests)
    by_package: dict[str, int] = {}
    otel: list[tuple[float, str]] = []
    for (filename, line, name), (_, ncalls, *_rest) in stats.items():
        package = "opentelemetry" if "opentelemetry" in filename else (
            "asgi_gateway" if "asgi_gateway" in filename else "builtins" if filename == "~" else "other"
        )  # fmt: skip
        by_package[package] = by_package.get(package, 0) + ncalls
        if package == "opentelemetry":
            where = filename.split("opentelemetry/", 1)[-1]
            otel.append((ncalls / requests, f"{name} ({where}:{line})"))
    lines = [
        f"calls per request, {setup}, tracing {tracing} (cProfile, {requests} requests; lifespan included)"
    ]
    lines += [f"  {package:<14} {count / requests:8.1f}" for package, count in sorted(by_package.items())]
    lines.append("  OpenTelemetry functions, most called:")
    lines += [f"  {per:8.2f}  {name}" for per, name in sorted(otel, reverse=True)[:top]]
    return "\n".join(lines)


# -- under valgrind ------------------------------------------------------------------------------


def count(tree: Path | None, setup: str, tracing: str, kind: str, requests: int, sdk_patch: str = "") -> int:
    """valgrind's instruction count of a whole process driving `requests` requests."""
    with tempfile.TemporaryDirectory(prefix="gw-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        env = dict(os.environ)
        env["PYTHONHASHSEED"] = "0"
        if tree is not None:
            env["PYTHONPATH"] = str(tree)
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no",
            "--compress-strings=no", sys.executable, str(Path(__file__).resolve()), "--child",
            "--setup", setup, "--tracing", tracing, "--config", kind, "--requests", str(requests),
            *(["--sdk-patch", sdk_patch] if sdk_patch else []),
        ]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=tmp, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"bench: valgrind run failed:\n{done.stderr[-2000:]}")
        return callgrind_total(out)


def callgrind_total(out: Path) -> int:
    """The instruction total of a callgrind output file."""
    for line in out.read_text().splitlines() if out.exists() else ():
        match = re.match(r"(?:summary|totals):\s+(\d+)", line)
        if match:
            return int(match.group(1))
    raise SystemExit(f"bench: no instruction total in callgrind's output {out}")


def per_request(
    tree: Path | None, setup: str, tracing: str, kind: str, requests: int, sdk_patch: str = ""
) -> float:
    return (
        count(tree, setup, tracing, kind, 2 * requests, sdk_patch)
        - count(tree, setup, tracing, kind, requests, sdk_patch)
    ) / requests


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", choices=SETUPS, action="append")
    parser.add_argument("--tracing", choices=TRACING, action="append")
    parser.add_argument("--config", choices=CONFIGS, default="plain")
    parser.add_argument(
        "--layers", action="store_true", help="the cost of configured layers on a route without them"
    )
    parser.add_argument("--requests", type=int, default=1000, help="N: the runs drive N and 2N requests")
    parser.add_argument("--tree", type=Path, action="append", help="a checkout to import asgi_gateway from")
    parser.add_argument(
        "--no-valgrind", action="store_true", help="time one run instead (CPU µs per request)"
    )
    parser.add_argument(
        "--calls", action="store_true", help="count function calls per request instead (cProfile)"
    )
    parser.add_argument(
        "--sdk-patch",
        action="append",
        metavar="PARTS",
        help="with these parts of bench/sdk_patch.py's SDK change applied (comma-separated, all, "
        "or none); repeated: one column each",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="the median of this many figures",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setups = args.setup or (["standalone", "fastapi"] if args.layers else list(SETUPS))
    levels = args.tracing or ["off"]
    kinds = [kind for kind in CONFIGS if kind != "transform"] if args.layers else [args.config]
    if args.layers and not args.calls and shutil.which("valgrind") and not args.no_valgrind:
        kinds = ["layers:none", "layers"]
    if args.child:
        run_once(setups[0], levels[0], args.config, args.requests, (args.sdk_patch or [""])[0])
        return 0
    if args.calls and args.layers:
        for setup in setups:
            for level in levels:
                print(layers_calls(setup, level, args.requests), flush=True)
        return 0
    if args.calls:
        for setup in setups:
            for level in levels:
                print(calls(setup, level, args.config, args.requests, 40))
        return 0
    if args.no_valgrind or shutil.which("valgrind") is None:
        if not args.no_valgrind:
            print("valgrind not found (apt-get install valgrind): CPU time instead", file=sys.stderr)
        for setup in setups:
            for level in levels:
                for kind in kinds:
                    spent = run_once(setup, level, kind, args.requests, (args.sdk_patch or [""])[0])
                    print(f"{setup:<14} tracing {level:<10} {kind:<7} {spent * 1e6:7.1f} µs per request")
        return 0
    columns: list[tuple[Path | None, str]] = [
        (tree, patch) for tree in (args.tree or [None]) for patch in (args.sdk_patch or [""])
    ]

    def title(tree: Path | None, patch: str) -> str:
        name = " ".join(part for part in (str(tree) if tree else "", f"sdk {patch}" if patch else "") if part)
        return (name or "this tree")[-18:]

    print(f"instructions per request (valgrind: {2 * args.requests} requests minus {args.requests})")
    header = f"{'set-up':<14} {'tracing':<10} {'config':<7}" + "".join(
        f" {title(tree, patch):>18}" for tree, patch in columns
    )
    print(header)
    for setup in setups:
        for level in levels:
            for kind in kinds:
                cells = [
                    statistics.median(
                        per_request(tree, setup, level, kind, args.requests, patch)
                        for _ in range(args.repeat)
                    )
                    for tree, patch in columns
                ]
                line = f"{setup:<14} {level:<10} {kind:<7}" + "".join(f" {cell:18,.0f}" for cell in cells)
                if len(cells) >= 2:
                    line += "".join(f"  {cell / cells[0]:.4f}{chr(215)}" for cell in cells[1:])
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
