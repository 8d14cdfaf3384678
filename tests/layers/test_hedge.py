"""Hedged requests through a real gateway (uvicorn in a thread) to real upstream processes.

A stalled server is one in the upstream app's hang mode: it reads the request and never
answers until its client goes away, which it counts as a disconnect, so the test sees on
the upstream's side that the losing try's connection was closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from servers import UpstreamProcess, Upstreams, wait_until

from asgi_gateway import ConfigError, Gateway
from asgi_gateway._config import HedgeConfig, load_config
from asgi_gateway._transports.pool import PoolTransport

DELAY = 0.05


class Observed:
    """A gateway's own pool, metrics and spans, for the test to read."""

    def __init__(self) -> None:
        self.pool = PoolTransport()
        self.metrics = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metrics])
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.gateway: Gateway | None = None

    def counter(self, name: str, attribute: str) -> dict[str, int]:
        """The points of counter `name`, by the value of `attribute`."""
        counts: dict[str, int] = {}
        data = self.metrics.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            key = str(point.attributes[attribute]) if point.attributes else ""
                            counts[key] = counts.get(key, 0) + int(point.value)  # type: ignore[union-attr]
        return counts

    def hedges(self) -> dict[str, int]:
        return self.counter("gateway.hedges", "gateway.hedge.result")

    def spans(self, kind: SpanKind) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.kind == kind]

    def status(self) -> dict[str, Any]:
        assert self.gateway is not None
        status: dict[str, Any] = self.gateway.status()["upstreams"]["svc"]
        return status

    def connections(self, index: int) -> int:
        assert self.gateway is not None
        return self.pool.connection_count(self.gateway.stacks["svc"].servers[index])


@pytest.fixture
def observed() -> Iterator[Observed]:
    observed = Observed()
    yield observed
    observed.tracer_provider.shutdown()
    observed.meter_provider.shutdown()


def config(*servers: UpstreamProcess | str, hedge: Any = None, **upstream: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "servers": [{"url": s if isinstance(s, str) else s.url} for s in servers],
        "timeouts": {"connect": 2.0, "read": 20.0, "total": 30.0},
        **upstream,
    }
    if hedge is not None:
        body["hedge"] = hedge
    return {"routes": [{"path": "/api", "upstream": "svc"}], "upstreams": {"svc": body}}


@pytest.fixture
def gateway(serve: Callable[..., str], observed: Observed) -> Callable[..., str]:
    """`gateway(config) -> base_url` of a bare `Gateway` over `observed`'s pool, meter and tracer."""

    def factory(config: dict[str, Any]) -> str:
        observed.gateway = Gateway(
            config,
            transport=observed.pool,
            meter_provider=observed.meter_provider,
            tracer_provider=observed.tracer_provider,
        )
        return serve(observed.gateway)

    return factory


def total_requests(upstreams: Upstreams, op: str) -> int:
    return sum(upstream.requests(op) for upstream in upstreams)


# -- the race ----------------------------------------------------------------------------


def test_a_hedge_wins_against_a_stalled_server_whose_connection_is_closed(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    upstreams.u1.fail(mode="hang")
    base = gateway(config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY}))
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(4):
            started = time.monotonic()
            response = client.get("/api/echo")
            assert response.status_code == 200, response.text
            assert response.headers["x-upstream-name"] == "u2"
            # The hedge answered, not a timeout (read is 20 s).
            assert time.monotonic() - started < 5
    # Round robin started half the requests on the stalled server: each was hedged to u2.
    stalled = upstreams.u1.requests("echo")
    assert stalled >= 1
    assert observed.hedges() == {"won": stalled}
    # The stalled server saw each losing connection close, and the pool kept none of them.
    upstreams.u1.wait_disconnects("echo", stalled)
    wait_until(lambda: observed.connections(0) == 0, message="the loser's connections to close")
    assert observed.connections(1) >= 1, "the winner's connection goes back to the pool"

    clients = observed.spans(SpanKind.CLIENT)
    cancelled = [
        span for span in clients if span.attributes and span.attributes.get("gateway.hedge.cancelled")
    ]
    assert len(cancelled) == stalled
    assert {span.attributes["server.port"] for span in cancelled if span.attributes} == {upstreams.u1.port}
    assert all(span.status.is_ok for span in cancelled), "a cancelled try is not an error"
    assert len(clients) == 4 + stalled
    servers = wait_until(
        lambda: len(observed.spans(SpanKind.SERVER)) == 4 and observed.spans(SpanKind.SERVER)
    )
    events = [event for span in servers for event in span.events]
    hedges = [event for event in events if event.name == "hedge"]
    assert len(hedges) == stalled
    assert all(event.attributes and event.attributes["gateway.hedge.delay"] == DELAY for event in hedges)
    results = [
        event.attributes["gateway.hedge.result"]
        for event in events
        if event.name == "hedge_result" and event.attributes
    ]
    assert results == ["won"] * stalled


def test_the_stalled_server_is_not_ejected_for_losing_hedges(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    upstreams.u1.fail(mode="hang")
    # One failure would eject it: a cancelled try must not count as one.
    base = gateway(
        config(
            upstreams.u1, upstreams.u2, hedge={"delay": DELAY}, outlier_detection={"consecutive_failures": 1}
        )
    )
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(8):
            assert client.get("/api/echo").status_code == 200
    assert upstreams.u1.requests("echo") >= 3
    stalled = observed.status()["servers"][0]
    assert stalled["state"] == "healthy", stalled
    assert stalled["ejections"] == 0 and stalled["consecutive_failures"] == 0, stalled
    assert observed.hedges() == {"won": upstreams.u1.requests("echo")}


def test_status_shows_the_hedge_config(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    gateway(config(upstreams.u1, hedge={"delay": 0.2, "max_extra": 2}))
    assert observed.status()["hedge"] == {"delay": 0.2, "max_extra": 2}


def test_a_slow_original_that_answers_first_makes_the_hedge_lose(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    base = gateway(config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY}))
    with httpx.Client(base_url=base, timeout=10) as client:
        # Both servers take 0.4 s: the hedge, sent 0.05 s later, is outrun by the original.
        response = client.get("/api/slow", params={"delay": "0.4"})
    assert response.status_code == 200
    assert total_requests(upstreams, "slow") == 2
    assert observed.hedges() == {"lost": 1}


# -- what is hedged ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "hedged"),
    [
        ("POST", {}, False),
        ("POST", {"idempotency-key": "k-1"}, True),
        ("PATCH", {}, False),
        ("PUT", {}, True),
    ],
)
def test_only_requests_that_may_be_sent_twice_are_hedged(
    method: str,
    headers: dict[str, str],
    hedged: bool,
    upstreams: Upstreams,
    gateway: Callable[..., str],
    observed: Observed,
) -> None:
    base = gateway(config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY}))
    with httpx.Client(base_url=base, timeout=10) as client:
        response = client.request(method, "/api/slow?delay=0.4", headers=headers, content=b"x" * 100)
    assert response.status_code == 200
    assert response.json()["body"] == "x" * 100
    assert total_requests(upstreams, "slow") == (2 if hedged else 1)
    assert sum(observed.hedges().values()) == (1 if hedged else 0)


def test_a_body_over_the_buffer_limit_is_not_hedged(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    base = gateway(config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY}, retry={"buffer_limit": 1024}))
    body = b"y" * 200_000
    with httpx.Client(base_url=base, timeout=10) as client:
        response = client.put("/api/slow?delay=0.4", content=body)
    assert response.status_code == 200
    assert response.json()["body_length"] == len(body)
    assert total_requests(upstreams, "slow") == 1
    assert observed.hedges() == {}


# -- the budget, retries, the deadline ----------------------------------------------------


def test_hedges_stop_when_the_budget_is_spent(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    # No share of the traffic, and a reserve of 0.2 per second over the 10 s window: 2 in all.
    retry = {"budget_ratio": 0, "budget_min_per_second": 0.2}
    base = gateway(config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY}, retry=retry))
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(5):
            assert client.get("/api/slow", params={"delay": "0.3"}).status_code == 200
    counts = observed.hedges()
    assert counts.get("won", 0) + counts.get("lost", 0) == 2, counts
    assert counts.get("skipped_budget") == 3, counts
    assert total_requests(upstreams, "slow") == 5 + 2


def test_a_try_that_fails_at_once_is_retried_not_hedged(
    upstreams: Upstreams,
    upstream_factory: Callable[..., UpstreamProcess],
    gateway: Callable[..., str],
    observed: Observed,
) -> None:
    dead = upstream_factory("dead")
    dead.kill()
    base = gateway(config(dead, upstreams.u2, hedge={"delay": 0.5}, outlier_detection=False))
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(4):
            started = time.monotonic()
            response = client.get("/api/echo")
            assert response.status_code == 200
            assert response.headers["x-upstream-name"] == "u2"
            # The refused connect is retried at once (backoff at most 25 ms), not after the delay.
            assert time.monotonic() - started < 0.4
    assert observed.hedges() == {}
    assert sum(observed.counter("gateway.retries", "gateway.retry.reason").values()) >= 1


def test_a_retried_status_waits_for_the_try_still_pending(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    upstreams.u1.admin("delay", seconds=0.3)
    upstreams.u2.fail(503)
    base = gateway(config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY}, outlier_detection=False))
    with httpx.Client(base_url=base, timeout=10) as client:
        for _ in range(4):
            response = client.get("/api/echo")
            assert response.status_code == 200, response.text
            assert response.headers["x-upstream-name"] == "u1"
    # A request that started on u1 had its hedge answer 503 first: it waited for u1, which won.
    counts = observed.hedges()
    assert counts.get("lost", 0) >= 1 and "won" not in counts, counts


def test_the_total_deadline_cancels_every_try(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    upstreams.u1.fail(mode="hang")
    upstreams.u2.fail(mode="hang")
    cfg = config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY})
    cfg["upstreams"]["svc"]["timeouts"]["total"] = 0.5
    base = gateway(cfg)
    with httpx.Client(base_url=base, timeout=10) as client:
        started = time.monotonic()
        response = client.get("/api/echo")
        elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"] == "gateway_timeout"
    assert 0.4 < elapsed < 3
    upstreams.u1.wait_disconnects("echo")
    upstreams.u2.wait_disconnects("echo")
    wait_until(lambda: observed.connections(0) + observed.connections(1) == 0, message="both tries closed")
    # Cut short by the deadline, not by a hedge: neither won.
    assert observed.hedges() == {}
    assert observed.status()["servers"][0]["in_flight"] == 0
    assert observed.status()["servers"][1]["in_flight"] == 0


def test_a_client_that_leaves_cancels_every_try(
    upstreams: Upstreams, gateway: Callable[..., str], observed: Observed
) -> None:
    upstreams.u1.fail(mode="hang")
    upstreams.u2.fail(mode="hang")
    base = gateway(config(upstreams.u1, upstreams.u2, hedge={"delay": DELAY}))
    with httpx.Client(base_url=base, timeout=1.0) as client, pytest.raises(httpx.ReadTimeout):
        client.get("/api/echo")
    upstreams.u1.wait_disconnects("echo")
    upstreams.u2.wait_disconnects("echo")
    wait_until(lambda: observed.connections(0) + observed.connections(1) == 0, message="both tries closed")


# -- configuration -------------------------------------------------------------------------


def test_hedge_config_is_parsed() -> None:
    loaded = load_config(config("http://127.0.0.1:9", hedge={"delay": 0.02, "max_extra": 2}))
    assert loaded.upstreams["svc"].hedge == HedgeConfig(delay=0.02, max_extra=2)
    assert load_config(config("http://127.0.0.1:9", hedge={})).upstreams["svc"].hedge == HedgeConfig()
    assert load_config(config("http://127.0.0.1:9")).upstreams["svc"].hedge is None


@pytest.mark.parametrize(
    ("hedge", "where"),
    [
        ({"delay": 0}, "upstreams.svc.hedge.delay"),
        ({"delay": -1}, "upstreams.svc.hedge.delay"),
        ({"delay": "fast"}, "upstreams.svc.hedge.delay"),
        ({"max_extra": 0}, "upstreams.svc.hedge.max_extra"),
        ({"max_extra": 5}, "upstreams.svc.hedge.max_extra"),
        ({"max_extra": True}, "upstreams.svc.hedge.max_extra"),
        ({"after": 1}, "upstreams.svc.hedge.after"),
    ],
)
def test_bad_hedge_config_names_the_key(hedge: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(config("http://127.0.0.1:9", hedge=hedge))
    assert where in str(caught.value)
