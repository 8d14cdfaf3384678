"""`{admin.path}/metrics`'s instruments: what a record costs, and that a scrape shows the same
text as `prometheus_client`'s own metrics would, while an OpenTelemetry meter beside them still
gets every record (a real gateway under uvicorn, against a real upstream).

The multiprocess mode of `asgi-gateway serve --workers` is tests/test_admin.py's
`test_metrics_with_workers_sum_every_worker`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import GatewayServer, Upstreams

from asgi_gateway import Gateway
from asgi_gateway._prometheus import MULTIPROC_DIR, PrometheusMeter
from asgi_gateway._semconv import DURATION_BUCKETS

ADMIN = "/-/gateway"
SERVER_ATTRIBUTES = {
    "http.request.method": "GET",
    "url.scheme": "http",
    "http.route": "/api",
    "http.response.status_code": 200,
}


@pytest.fixture
def meter(monkeypatch: pytest.MonkeyPatch) -> PrometheusMeter:
    # The in-process mode, whatever the environment running the tests says.
    monkeypatch.delenv(MULTIPROC_DIR, raising=False)
    return PrometheusMeter()


def calls_made(record: Callable[[], None]) -> list[str]:
    """The functions (Python and built-in) that one call of `record` calls, itself included."""
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            called.append(f"{frame.f_code.co_filename}:{frame.f_code.co_qualname}")
        elif event == "c_call" and arg is not sys.setprofile:
            called.append(f"builtin:{arg.__qualname__}")

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        record()
    finally:
        sys.setprofile(previous)
    return called


def test_a_record_costs_a_lookup_and_an_addition(meter: PrometheusMeter) -> None:
    """Per request the gateway records twice (server and client duration): no prometheus_client
    call, no lock, only the instrument's own method, the attributes' items and, for a
    histogram, the bucket's bisect."""
    instruments = meter.meter(None)
    histogram = instruments.create_histogram(
        "http.server.request.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS
    )
    counter = instruments.create_counter("gateway.retries", unit="{retry}")
    sessions = instruments.create_up_down_counter("gateway.websocket.sessions", unit="{session}")
    records: list[tuple[Callable[[], None], int]] = [
        (lambda: histogram.record(0.012, SERVER_ATTRIBUTES), 3),
        (lambda: histogram.record(0.012), 2),
        (lambda: counter.add(1, {"gateway.upstream": "api"}), 2),
        (lambda: sessions.add(-1, {"gateway.upstream": "api"}), 2),
    ]
    for record, most in records:
        record()  # the first record of a set of attributes makes its child
        called = calls_made(record)
        # The lambda itself, then what the record costs.
        assert len(called) - 1 <= most, called
        assert not [name for name in called if "prometheus_client" in name], called


def normalised(text: str) -> str:
    """An exposition with each child's `_created` time left out (the clock differs)."""
    return re.sub(r"(_created(?:\{[^}]*\})?) \S+", r"\1 T", text)


@pytest.mark.parametrize("created", [True, False], ids=["created", "no-created"])
def test_a_scrape_shows_what_prometheus_clients_metrics_would(
    meter: PrometheusMeter, monkeypatch: pytest.MonkeyPatch, created: bool
) -> None:
    """Names, labels (bools as true/false), buckets and every sample, `_created` included
    unless prometheus_client was told to leave it out, as its own metrics show them."""
    from prometheus_client import metrics

    monkeypatch.setattr(metrics, "_use_created", created)
    instruments = meter.meter(None)
    ours = {
        "duration": instruments.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP server requests.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        ),
        "size": instruments.create_histogram(
            "gateway.body.size", unit="By", explicit_bucket_boundaries_advisory=[0.0, 1, 10, 100.5]
        ),
        "retries": instruments.create_counter("gateway.retries", unit="{retry}", description="Retries."),
        "reloads": instruments.create_counter("gateway.config.reloads", unit="{reload}"),
        "sessions": instruments.create_up_down_counter(
            "gateway.websocket.sessions", unit="{session}", description="Open sessions."
        ),
    }
    registry = CollectorRegistry(auto_describe=False)
    theirs: dict[str, Any] = {
        "duration": Histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests.",
            ["http_request_method", "url_scheme", "http_route", "http_response_status_code"],
            registry=registry,
            buckets=DURATION_BUCKETS,
        ),
        "size": Histogram(
            "gateway_body_size_bytes", "gateway.body.size", registry=registry, buckets=[0.0, 1, 10, 100.5]
        ),
        "retries": Counter(
            "gateway_retries", "Retries.", ["gateway_upstream", "gateway_hedge"], registry=registry
        ),
        "reloads": Counter("gateway_config_reloads", "gateway.config.reloads", registry=registry),
        "sessions": Gauge(
            "gateway_websocket_sessions", "Open sessions.", ["gateway_upstream"], registry=registry
        ),
    }
    for amount in (0.0, 0.004, 0.005, 0.0051, 0.3, 9.99, 10.0, 11.0, 250.0):
        for status in (200, 503):
            attributes = {**SERVER_ATTRIBUTES, "http.response.status_code": status}
            ours["duration"].record(amount, attributes)
            theirs["duration"].labels("GET", "http", "/api", str(status)).observe(amount)
    for amount in (0, 0.0, 1, 5, 10, 10.000001, 200, -1):
        ours["size"].record(amount)
        theirs["size"].observe(amount)
    for upstream, hedge, amount in (("api", True, 1), ("web", False, 2.5), ("api", True, 1)):
        ours["retries"].add(amount, {"gateway.upstream": upstream, "gateway.hedge": hedge})
        theirs["retries"].labels(upstream, "true" if hedge else "false").inc(amount)
    ours["reloads"].add(1)
    theirs["reloads"].inc(1)
    for upstream, amount in (("api", 1), ("api", 1), ("web", 1), ("api", -1), ("web", -1)):
        ours["sessions"].add(amount, {"gateway.upstream": upstream})
        theirs["sessions"].labels(upstream).inc(amount)
    body, content_type = meter.exposition()
    assert content_type.startswith("text/plain")
    assert normalised(body.decode()) == normalised(generate_latest(registry).decode())
    assert ("_created" in body.decode()) is created


def test_a_negative_amount_leaves_a_counter_as_it_was(meter: PrometheusMeter) -> None:
    counter = meter.meter(None).create_counter("gateway.retries", unit="{retry}")
    counter.add(2, {"gateway.upstream": "api"})
    counter.add(-1, {"gateway.upstream": "api"})
    assert 'gateway_retries_total{gateway_upstream="api"} 2.0' in meter.exposition()[0].decode()


def samples(text: str) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_the_meter_provider_gets_every_record_the_page_shows(upstreams: Upstreams) -> None:
    """A user's `meter_provider` beside `/metrics`: both count each request and attempt."""
    u1 = upstreams.u1
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    config = {
        "routes": [{"path": "/", "upstream": "main"}],
        "upstreams": {"main": {"servers": [{"url": u1.url}]}},
        "admin": {"path": ADMIN},
    }
    try:
        with GatewayServer(Gateway(config, meter_provider=provider)) as server:
            with httpx.Client(base_url=server.url, timeout=10) as client:
                assert [client.get("/echo").status_code for _ in range(7)] == [200] * 7
                page = client.get(f"{ADMIN}/metrics")
        assert page.status_code == 200
        found = samples(page.text)
        data = reader.get_metrics_data()
        assert data is not None
        counts: dict[str, int] = {}
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if isinstance(metric.data, SdkHistogram):
                        counts[metric.name] = sum(point.count for point in metric.data.data_points)
        for name in ("http_server_request_duration_seconds", "http_client_request_duration_seconds"):
            shown = sum(s.value for s in found[f"{name}_count"])
            assert shown == 7, name
        assert counts["http.server.request.duration"] == 7
        assert counts["http.client.request.duration"] == 7
    finally:
        provider.shutdown()
