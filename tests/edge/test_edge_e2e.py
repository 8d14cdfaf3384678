"""Edge protection through a real gateway (uvicorn in a thread) to real upstream processes:
IP rules, JWT authentication and memory/Redis rate limits, in that order, as the client sees them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from edge.redis_server import RedisServer
from edge.tokens import SECRET, JwksServer, jwk, pem, token
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from servers import Upstreams, free_port, http_client, wait_until

from asgi_gateway import Gateway

GatewayFactory = Callable[..., str]


class Otel:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def decisions(self) -> dict[tuple[str, str], int]:
        found: dict[tuple[str, str], int] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "gateway.rate_limit.decisions":
                        for point in metric.data.data_points:
                            attributes = point.attributes
                            key = (attributes["http.route"], attributes["gateway.rate_limit.result"])
                            found[key] = point.value
        return found

    def server_spans(self) -> list[Any]:
        return [span for span in self.exporter.get_finished_spans() if span.kind == SpanKind.SERVER]


@pytest.fixture
def otel() -> Iterator[Otel]:
    sdk = Otel()
    yield sdk
    sdk.tracer_provider.shutdown()
    sdk.meter_provider.shutdown()


def config(upstreams: Upstreams, *routes: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "routes": [{"upstream": "u", **route} for route in routes],
        "upstreams": {
            "u": {"servers": [upstreams.u1.url]},
            "dead": {"servers": [f"http://127.0.0.1:{free_port()}"]},
        },
        **top,
    }


def limit_headers(response: httpx.Response) -> tuple[int, int, int]:
    return (
        int(response.headers["ratelimit-limit"]),
        int(response.headers["ratelimit-remaining"]),
        int(response.headers["ratelimit-reset"]),
    )


# -- rate limits in memory ----------------------------------------------------------------------


def test_a_burst_passes_then_429_with_headers(
    upstreams: Upstreams,
    standalone_gateway_factory: GatewayFactory,
    otel: Otel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = standalone_gateway_factory(
        config(upstreams, {"path": "/api", "rate_limit": {"rate": 1, "per": 60, "burst": 3}}),
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    caplog.set_level(logging.INFO, logger="asgi_gateway.access")
    with http_client(base) as client:
        answers = [client.get("/api/echo") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert [limit_headers(r)[:2] for r in answers] == [(3, 2), (3, 1), (3, 0), (3, 0)]
    refused = answers[3]
    assert refused.json()["error"] == "rate_limited"
    assert refused.headers["content-type"] == "application/json"
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert 1 <= limit_headers(refused)[2] <= 180
    assert upstreams.u1.requests() == 3
    assert otel.decisions() == {("/api", "allowed"): 3, ("/api", "limited"): 1}
    spans = wait_until(lambda: len(otel.server_spans()) == 4 and otel.server_spans())
    assert [s.attributes["gateway.rate_limit.result"] for s in spans] == ["allowed"] * 3 + ["limited"]
    records = wait_until(lambda: [r for r in caplog.records if r.name == "asgi_gateway.access"])
    assert [getattr(r, "rate_limit", None) for r in records][-1] == "limited"


def test_rate_limit_headers_on_the_gateways_own_errors(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory
) -> None:
    base = standalone_gateway_factory(
        config(upstreams, {"path": "/dead", "upstream": "dead", "rate_limit": {"rate": 100, "burst": 5}})
    )
    with http_client(base) as client:
        response = client.get("/dead/echo")
    assert response.status_code == 502
    assert limit_headers(response)[:2] == (5, 4)


def test_refill_through_the_gateway_matches_gcra(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory
) -> None:
    base = standalone_gateway_factory(
        config(upstreams, {"path": "/api", "rate_limit": {"rate": 10, "burst": 2}})
    )
    allowed = 0
    with http_client(base) as client:
        start = time.monotonic()
        while time.monotonic() - start < 2.0:
            if client.get("/api/echo").status_code == 200:
                allowed += 1
            time.sleep(0.01)
        elapsed = time.monotonic() - start
    expected = 2 + 10 * elapsed
    assert abs(allowed - expected) <= 2, (allowed, expected)


def test_shadow_mode_counts_but_never_refuses(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory, otel: Otel
) -> None:
    base = standalone_gateway_factory(
        config(upstreams, {"path": "/api", "rate_limit": {"rate": 1, "per": 60, "burst": 1, "shadow": True}}),
        meter_provider=otel.meter_provider,
    )
    with http_client(base) as client:
        answers = [client.get("/api/echo") for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert "ratelimit-limit" not in answers[0].headers
    assert otel.decisions() == {("/api", "allowed"): 1, ("/api", "shadow"): 2}


def test_a_header_key_gives_each_value_its_bucket(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory
) -> None:
    base = standalone_gateway_factory(
        config(
            upstreams,
            {"path": "/api", "rate_limit": {"rate": 1, "per": 60, "burst": 1, "key": "header:x-api-key"}},
        )
    )
    with http_client(base) as client:
        assert client.get("/api/echo", headers={"x-api-key": "a"}).status_code == 200
        assert client.get("/api/echo", headers={"x-api-key": "a"}).status_code == 429
        assert client.get("/api/echo", headers={"x-api-key": "b"}).status_code == 200
        # Without the header: counted by client address, apart from every header value.
        assert client.get("/api/echo").status_code == 200
        assert client.get("/api/echo").status_code == 429


def test_a_route_without_edge_keys_gets_its_stack_as_it_is(upstreams: Upstreams) -> None:
    gateway = Gateway(config(upstreams, {"path": "/plain"}, {"path": "/api", "rate_limit": {"rate": 5}}))
    assert gateway.route_handlers[0] is gateway.stacks["u"].handler
    assert gateway.route_handlers[1] is not gateway.stacks["u"].handler
    assert not Gateway(config(upstreams, {"path": "/plain"})).edge.active


# -- JWT ------------------------------------------------------------------------------------------


def test_jwt_answers_and_claims_to_headers(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory, rsa_keys: Any
) -> None:
    jwt_config = {
        "public_key": pem(rsa_keys[0]),
        "issuer": "https://issuer/",
        "claims_to_headers": {"sub": "x-user-id", "roles": "x-roles"},
    }
    base = standalone_gateway_factory(
        config(
            upstreams,
            {"path": "/api", "auth": {"jwt": jwt_config}},
            {"path": "/hidden", "auth": {"jwt": {**jwt_config, "forward_authorization": False}}},
        )
    )
    good = token(rsa_keys[0], iss="https://issuer/", roles=["a", "b"])
    with http_client(base) as client:
        missing = client.get("/api/echo")
        assert missing.status_code == 401
        assert missing.json()["error"] == "unauthorized"
        assert missing.headers["www-authenticate"] == "Bearer"
        for bad in (
            token(rsa_keys[1], iss="https://issuer/"),
            token(rsa_keys[0], iss="https://evil/"),
            "garbage",
        ):
            refused = client.get("/api/echo", headers={"authorization": f"Bearer {bad}"})
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        ok = client.get(
            "/api/echo",
            headers=[("authorization", f"Bearer {good}"), ("x-user-id", "admin"), ("X-User-Id", "root")],
        )
        assert ok.status_code == 200
        sent = ok.json()["headers"]
        assert [v for k, v in sent if k == "x-user-id"] == ["user-1"]
        assert [v for k, v in sent if k == "x-roles"] == ['["a","b"]']
        assert [v for k, v in sent if k == "authorization"] == [f"Bearer {good}"]
        hidden = client.get("/hidden/echo", headers={"authorization": f"Bearer {good}"})
        assert hidden.status_code == 200
        assert not [v for k, v in hidden.json()["headers"] if k == "authorization"]
    assert upstreams.u1.requests() == 2


def test_jwt_audience_and_leeway_through_the_gateway(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory
) -> None:
    jwt_config = {"secret": SECRET, "algorithms": ["HS256"], "audience": ["api", "admin"], "leeway": 30}
    base = standalone_gateway_factory(config(upstreams, {"path": "/api", "auth": {"jwt": jwt_config}}))
    now = int(time.time())
    with http_client(base) as client:

        def status(**claims: Any) -> int:
            bearer = token(SECRET, "HS256", **claims)
            return client.get("/api/echo", headers={"authorization": f"Bearer {bearer}"}).status_code

        assert status(aud="api") == 200
        assert status(aud=["other", "admin"]) == 200
        assert status(aud="other") == 401
        assert status(aud=None) == 401
        # Within the 30 s leeway, a token just expired or just not yet valid still passes.
        assert status(aud="api", exp=now - 10) == 200
        assert status(aud="api", nbf=now + 10) == 200
        assert status(aud="api", exp=now - 120) == 401
        assert status(aud="api", nbf=now + 120) == 401
    assert upstreams.u1.requests() == 4


def test_a_claim_keys_the_rate_limit(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory
) -> None:
    base = standalone_gateway_factory(
        config(
            upstreams,
            {
                "path": "/api",
                "auth": {"jwt": {"secret": SECRET, "algorithms": ["HS256"]}},
                "rate_limit": {"rate": 1, "per": 60, "burst": 1, "key": "claim:sub"},
            },
        )
    )

    def call(sub: str) -> int:
        return client.get(
            "/api/echo", headers={"authorization": f"Bearer {token(SECRET, 'HS256', sub=sub)}"}
        ).status_code

    with http_client(base) as client:
        assert [call("alice"), call("alice"), call("bob")] == [200, 429, 200]
        # Refused by auth before the limit: an invalid token spends nobody's budget.
        assert client.get("/api/echo").status_code == 401


@pytest.fixture
def jwks(serve: Callable[..., str]) -> Iterator[tuple[JwksServer, str]]:
    state = JwksServer()
    base = serve(state.app())
    try:
        yield state, f"{base}/jwks.json"
    finally:
        state.hanging.clear()


def test_a_key_rotation_refuses_no_valid_request(
    upstreams: Upstreams,
    standalone_gateway_factory: GatewayFactory,
    jwks: tuple[JwksServer, str],
    rsa_keys: Any,
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_keys[0], "k1")]
    base = standalone_gateway_factory(config(upstreams, {"path": "/api", "auth": {"jwt": {"jwks_url": url}}}))
    assert state.requests == 1  # fetched at start-up
    old, new = token(rsa_keys[0], kid="k1"), token(rsa_keys[1], kid="k2")
    with http_client(base) as client:
        assert client.get("/api/echo", headers={"authorization": f"Bearer {old}"}).status_code == 200
        state.keys = [jwk(rsa_keys[0], "k1"), jwk(rsa_keys[1], "k2")]
        statuses: list[int] = []
        lock = threading.Lock()

        def call(value: str) -> None:
            with http_client(base) as own:
                status = own.get("/api/echo", headers={"authorization": f"Bearer {value}"}).status_code
            with lock:
                statuses.append(status)

        threads = [threading.Thread(target=call, args=(new if i % 2 else old,)) for i in range(10)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert statuses == [200] * 10
        assert state.requests == 2  # one refetch for all of them
        # A kid nobody published: refused at once, and no refetch within 30 s.
        stranger = token(rsa_keys[2], kid="k3")
        refused = client.get("/api/echo", headers={"authorization": f"Bearer {stranger}"})
        assert refused.status_code == 401
        assert state.requests == 2


def test_a_reload_keeps_the_fetched_keys_without_fetching_them_again(
    upstreams: Upstreams,
    standalone_gateway_factory: GatewayFactory,
    jwks: tuple[JwksServer, str],
    rsa_keys: Any,
    tmp_path: Any,
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_keys[0], "k1")]
    cfg = config(upstreams, {"path": "/api", "auth": {"jwt": {"jwks_url": url}}}, admin={"path": "/-/gw"})
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(cfg))
    base = standalone_gateway_factory(str(path))
    assert state.requests == 1
    valid = {"authorization": f"Bearer {token(rsa_keys[0], kid='k1')}"}
    cfg["routes"].append({"path": "/more", "upstream": "u", "auth": {"jwt": {"jwks_url": url}}})
    path.write_text(json.dumps(cfg))
    with http_client(base) as client:
        for _ in range(3):
            assert client.post("/-/gw/reload").status_code == 200
        assert client.get("/api/echo", headers=valid).status_code == 200
        assert client.get("/more/echo", headers=valid).status_code == 200
    # The set fetched at start-up is still fresh (max-age=300): no reload fetched it again.
    assert state.requests == 1


def test_a_hanging_jwks_server_does_not_delay_requests_with_cached_keys(
    upstreams: Upstreams,
    standalone_gateway_factory: GatewayFactory,
    jwks: tuple[JwksServer, str],
    rsa_keys: Any,
) -> None:
    state, url = jwks
    state.keys = [jwk(rsa_keys[0], "k1")]
    base = standalone_gateway_factory(config(upstreams, {"path": "/api", "auth": {"jwt": {"jwks_url": url}}}))
    state.hanging.set()
    cached = token(rsa_keys[0], kid="k1")
    unknown = token(rsa_keys[1], kid="k2")

    def unknown_kid() -> None:
        with http_client(base) as own:
            own.get("/api/echo", headers={"authorization": f"Bearer {unknown}"})

    waiting = threading.Thread(target=unknown_kid)
    waiting.start()  # an unknown kid: the background refetch now hangs on the JWKS server
    wait_until(lambda: state.requests == 2, message="the refetch to reach the JWKS server")
    with http_client(base) as client:
        for _ in range(20):
            start = time.monotonic()
            assert client.get("/api/echo", headers={"authorization": f"Bearer {cached}"}).status_code == 200
            assert time.monotonic() - start < 0.5
    state.hanging.clear()
    waiting.join(10)


# -- IP rules -------------------------------------------------------------------------------------


def test_ip_rules_without_trusted_proxies(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory
) -> None:
    base = standalone_gateway_factory(
        config(
            upstreams,
            {"path": "/denied", "deny_ips": ["127.0.0.0/8"]},
            {"path": "/office", "allow_ips": ["10.0.0.0/8"]},
            {"path": "/local", "allow_ips": ["127.0.0.1"], "deny_ips": ["10.0.0.0/8"]},
        )
    )
    spoofed = {"x-forwarded-for": "10.1.2.3", "x-real-ip": "10.1.2.3", "forwarded": "for=10.1.2.3"}
    with http_client(base) as client:
        denied = client.get("/denied/echo", headers=spoofed)
        assert denied.status_code == 403
        assert denied.json()["error"] == "forbidden"
        # The client is not a trusted proxy: its X-Forwarded-For says nothing about its address.
        assert client.get("/office/echo", headers=spoofed).status_code == 403
        assert client.get("/local/echo", headers=spoofed).status_code == 200
    assert upstreams.u1.requests() == 1


def test_ip_rules_behind_a_trusted_proxy(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory
) -> None:
    base = standalone_gateway_factory(
        config(
            upstreams,
            {"path": "/office", "allow_ips": ["10.0.0.0/8"], "deny_ips": ["10.6.6.6"]},
            trusted_proxies=["127.0.0.1"],
        )
    )
    with http_client(base) as client:
        assert client.get("/office/echo", headers={"x-forwarded-for": "10.1.2.3"}).status_code == 200
        assert client.get("/office/echo", headers={"x-forwarded-for": "10.6.6.6"}).status_code == 403
        assert client.get("/office/echo", headers={"x-forwarded-for": "192.0.2.1"}).status_code == 403
        # The client's own claim left of a real hop counts for nothing: the first untrusted hop does.
        assert (
            client.get("/office/echo", headers={"x-forwarded-for": "10.1.2.3, 192.0.2.1"}).status_code == 403
        )
        assert client.get("/office/echo").status_code == 403  # the proxy itself, 127.0.0.1


# -- Redis ----------------------------------------------------------------------------------------


def test_redis_down_fails_open_counted_and_limiting_resumes(
    upstreams: Upstreams,
    standalone_gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    otel: Otel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = standalone_gateway_factory(
        config(
            upstreams,
            {"path": "/api", "rate_limit": {"rate": 1, "per": 60, "burst": 2, "backend": "redis"}},
            redis={"url": redis_server.url, "timeout": 0.2},
        ),
        meter_provider=otel.meter_provider,
    )
    with http_client(base) as client:
        assert [client.get("/api/echo").status_code for _ in range(3)] == [200, 200, 429]
        redis_server.kill()
        for _ in range(5):
            start = time.monotonic()
            response = client.get("/api/echo")
            assert response.status_code == 200
            assert time.monotonic() - start < 1.0
        assert otel.decisions()[("/api", "backend_error")] == 5
        assert len([r for r in caplog.records if "Redis at" in r.getMessage()]) == 1
        redis_server.start()  # empty: the script is loaded again, the bucket starts anew
        assert [client.get("/api/echo").status_code for _ in range(3)] == [200, 200, 429]


def test_redis_down_with_on_error_deny_answers_503(
    upstreams: Upstreams, standalone_gateway_factory: GatewayFactory, redis_server: RedisServer
) -> None:
    base = standalone_gateway_factory(
        config(
            upstreams,
            {"path": "/api", "rate_limit": {"rate": 100, "backend": "redis"}},
            redis={"url": redis_server.url, "timeout": 0.2, "on_error": "deny"},
        )
    )
    redis_server.kill()
    with http_client(base) as client:
        response = client.get("/api/echo")
    assert response.status_code == 503
    assert response.json()["error"] == "upstream_unavailable"
    assert response.headers["retry-after"] == "1"


def test_three_gateway_processes_on_one_redis_enforce_one_limit(
    upstreams: Upstreams, redis_server: RedisServer
) -> None:
    from chaos.chaos_tools import GatewayProcess

    rate, burst = 10, 5
    spec = config(
        upstreams,
        {"path": "/api", "rate_limit": {"rate": rate, "burst": burst, "key": "route", "backend": "redis"}},
        redis={"url": redis_server.url, "timeout": 0.5},
    )
    processes = [GatewayProcess(spec, mode="cli") for _ in range(3)]
    try:
        for process in processes:
            process.start()
        clients = [http_client(process.url) for process in processes]
        allowed = 0
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < 2.0:
            if clients[i % 3].get("/api/echo").status_code == 200:
                allowed += 1
            i += 1
            time.sleep(0.005)
        elapsed = time.monotonic() - start
        for client in clients:
            client.close()
        exact = burst + rate * elapsed
        assert i > 3 * exact  # the limit, not the load, decided
        assert abs(allowed - exact) <= burst + 1, (allowed, exact)
    finally:
        for process in processes:
            process.close()


@pytest.fixture(scope="module")
def ws_upstream() -> Iterator[Any]:
    from test_websocket import WsUpstream

    upstream = WsUpstream("wa")
    try:
        upstream.start()
        yield upstream
    finally:
        upstream.close()


def test_websocket_handshakes_on_protected_routes_go_through_the_edge_checks(
    ws_upstream: Any, standalone_gateway_factory: GatewayFactory
) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    ws_upstream.ensure_running()
    ws_upstream.admin("reset")
    spec = {
        "routes": [
            {"path": "/denied", "upstream": "ws", "deny_ips": ["127.0.0.0/8"]},
            {
                "path": "/ws",
                "upstream": "ws",
                "deny_ips": ["192.0.2.0/24"],
                "auth": {"jwt": {"secret": SECRET, "algorithms": ["HS256"]}},
                "rate_limit": {"rate": 1, "per": 60, "burst": 2, "key": "route"},
            },
        ],
        "upstreams": {"ws": {"servers": [ws_upstream.url]}},
    }
    base = standalone_gateway_factory(spec).replace("http", "ws", 1)
    bearer = {"authorization": f"Bearer {token(SECRET, 'HS256')}"}

    def refused(path: str, **kwargs: Any) -> Any:
        with pytest.raises(InvalidStatus) as caught:
            connect(base + path, proxy=None, open_timeout=10, **kwargs).close()
        return caught.value.response

    denied = refused("/denied/echo?id=denied")
    assert denied.status_code == 403
    assert json.loads(denied.body)["error"] == "forbidden"
    unauthorized = refused("/ws/echo?id=anonymous")
    assert unauthorized.status_code == 401
    assert json.loads(unauthorized.body)["error"] == "unauthorized"
    assert unauthorized.headers["www-authenticate"].startswith("Bearer")
    assert ws_upstream.handshakes() == 0
    for remaining in (1, 0):
        with connect(
            base + "/ws/echo?id=allowed", proxy=None, open_timeout=10, additional_headers=bearer
        ) as ws:
            assert ws.response is not None
            assert int(ws.response.headers["ratelimit-remaining"]) == remaining
            ws.send("hello")
            assert ws.recv(timeout=10) == "hello"
    assert ws_upstream.handshakes() == 2
    limited = refused("/ws/echo?id=limited", additional_headers=bearer)
    assert limited.status_code == 429
    assert json.loads(limited.body)["error"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert ws_upstream.handshakes() == 2
