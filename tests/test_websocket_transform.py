"""The transformation layer on WebSocket handshakes, end to end.

A real client, the gateway under uvicorn and `test_websocket`'s upstream app (a uvicorn
subprocess that reports the handshake it saw with `cmd:info`): header rules both ways, the
path rewrite, RFC 7239 `Forwarded` and the `on_request`/`on_response` hooks, on the
handshake as on any request.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from test_websocket import WsUpstream, _FakeClient, ask, gateway, header, session_id, ws

from asgi_gateway import (
    BufferedStream,
    ConfigError,
    Forbidden,
    Gateway,
    Hooks,
    Request,
    Response,
    load_config,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def upstream() -> Iterator[WsUpstream]:
    with WsUpstream("wa") as process:
        yield process


@pytest.fixture
def wa(upstream: WsUpstream) -> WsUpstream:
    upstream.ensure_running()
    upstream.admin("reset")
    return upstream


# -- hooks: what the query string's `hook=` asks for ------------------------------------------


def on_request(request: Request) -> Request | Response | None:
    assert request.upgrade is not None, "a WebSocket handshake carries its upgrade"
    target = request.target
    if b"hook=refuse" in target:
        body = b"no sockets today"
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        return Response(403, headers, BufferedStream(body))
    if b"hook=forbid" in target:
        raise Forbidden("no sockets for you")
    if b"hook=boom" in target:
        raise RuntimeError("secret detail of the failure")
    if b"hook=101" in target:
        # A hook cannot accept a handshake itself: only an upstream can.
        return Response(101, [], BufferedStream(b""))
    if b"hook=handshake" in target:
        # The handshake's own headers are the gateway's client's to write.
        request.headers.append((b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="))
        request.headers.append((b"sec-websocket-protocol", b"chat.v9"))
    request.headers.append((b"x-hooked", b"yes"))
    request.target = target.replace(b"/hooked/", b"/hooked/changed/")
    return request


def on_response(request: Request, response: Response) -> None:
    response.headers.append((b"x-hook-saw", str(response.status).encode()))


HOOKS = {"/hooked": Hooks(on_request=on_request, on_response=on_response)}


def transform_config(url: str, **top: Any) -> dict[str, Any]:
    return {
        "routes": [
            {
                "path": "/rules",
                "upstream": "ws",
                "request_headers": {
                    "set": {"x-set": "fixed", "x-vars": "{client_ip}|{route}|{upstream}"},
                    "add": {"x-added": "two"},
                    "remove": ["x-remove-me"],
                },
                "response_headers": {
                    "set": {"x-served-by": "{server}"},
                    "add": {"x-b": "second"},
                    "remove": ["set-cookie"],
                },
            },
            {
                "path": "/v",
                "upstream": "ws",
                "strip_prefix": True,
                "rewrite": {"pattern": r"^/v(\d+)/(?P<room>[^/]+)$", "replacement": "/rooms/${room}/v$1"},
            },
            {"path": "/fwd", "upstream": "ws", "forwarded": True},
            {"path": "/hooked", "upstream": "ws", "response_headers": {"add": {"x-rule": "after-hook"}}},
        ],
        "upstreams": {"ws": {"servers": [{"url": url}], "retry": {"attempts": 1}}},
        **top,
    }


async def info_of(url: str, **kwargs: Any) -> tuple[dict[str, Any], Any]:
    """What the upstream saw of this handshake, and the client's view of the 101."""
    async with ws(url, **kwargs) as connection:
        info = json.loads(await ask(connection, "cmd:info"))
        return info, connection.response


async def refusal_of(url: str, **kwargs: Any) -> Any:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as caught:
        async with ws(url, **kwargs):
            pass
    return caught.value.response


# -- header rules, rewrite, Forwarded ---------------------------------------------------------


async def test_request_header_rules_reach_the_upstreams_handshake(wa: WsUpstream) -> None:
    with gateway(transform_config(wa.url)) as base:
        info, _ = await info_of(
            f"{base}/rules/echo?id={session_id()}",
            additional_headers=[
                ("X-Set", "from-client-1"),
                ("X-Set", "from-client-2"),
                ("X-Added", "one"),
                ("X-Remove-Me", "secret"),
                ("X-Other", "kept"),
            ],
        )
    assert header(info, "x-set") == ["fixed"]
    assert header(info, "x-vars") == ["127.0.0.1|/rules|ws"]
    assert header(info, "x-added") == ["one", "two"]
    assert header(info, "x-remove-me") == []
    assert header(info, "x-other") == ["kept"]
    # The handshake is still the gateway's client's own.
    assert len(header(info, "sec-websocket-key")) == 1


async def test_response_header_rules_apply_to_the_101_and_to_a_refusal(wa: WsUpstream) -> None:
    with gateway(transform_config(wa.url)) as base:
        _, accepted = await info_of(f"{base}/rules/echo?id={session_id()}")
        refused = await refusal_of(f"{base}/rules/echo?id={session_id()}&refuse=403")
    # The upstream's 101 sets `upstream=wa`: the rule removes it; the others are added.
    assert accepted.headers.get_all("set-cookie") == []
    assert accepted.headers["x-served-by"] == wa.url
    assert accepted.headers["x-b"] == "second"
    assert "x-request-id" in accepted.headers
    assert refused.status_code == 403
    assert refused.body == b"refused by wa"
    assert refused.headers["x-b"] == "second"
    assert refused.headers["x-served-by"] == wa.url


async def test_rewrite_changes_the_handshake_path(wa: WsUpstream) -> None:
    session = session_id()
    with gateway(transform_config(wa.url)) as base:
        info, _ = await info_of(f"{base}/v/v2/lobby?id={session}&a=1&a=2")
        # A path the pattern does not match goes as it is (prefix stripped).
        plain, _ = await info_of(f"{base}/v/other/path?id={session_id()}")
    assert info["raw_path"] == "/rooms/lobby/v2"
    assert info["query_string"] == f"id={session}&a=1&a=2"
    assert plain["raw_path"] == "/other/path"


async def test_forwarded_is_sent_on_the_handshake_and_cannot_be_spoofed(wa: WsUpstream) -> None:
    spoofed = [
        ("Forwarded", "for=198.51.100.1;proto=https;host=evil.example"),
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
    ]
    with gateway(transform_config(wa.url)) as base:
        host = base.split("//")[1]
        info, _ = await info_of(f"{base}/fwd/echo?id={session_id()}", additional_headers=spoofed)
        # Off on the route (the default): an untrusted client's Forwarded goes.
        plain, _ = await info_of(f"{base}/rules/echo?id={session_id()}", additional_headers=spoofed)
    assert header(info, "forwarded") == [f'for=127.0.0.1;proto=http;host="{host}"']
    assert header(info, "x-forwarded-for") == ["127.0.0.1"]
    assert header(plain, "forwarded") == []


# -- hooks ------------------------------------------------------------------------------------


async def test_an_on_request_hook_adds_headers_and_changes_the_handshake_path(wa: WsUpstream) -> None:
    with gateway(transform_config(wa.url), hooks=HOOKS) as base:
        info, accepted = await info_of(f"{base}/hooked/echo?id={session_id()}")
    assert header(info, "x-hooked") == ["yes"]
    assert info["raw_path"] == "/hooked/changed/echo"
    # on_response saw the upstream's 101; what it and the rules add reaches the client with the accept.
    assert accepted.headers["x-hook-saw"] == "101"
    assert accepted.headers["x-rule"] == "after-hook"


async def test_an_on_request_hook_refuses_the_handshake(wa: WsUpstream) -> None:
    with gateway(transform_config(wa.url), hooks=HOOKS) as base:
        answered = await refusal_of(f"{base}/hooked/echo?id={session_id()}&hook=refuse")
        forbidden = await refusal_of(f"{base}/hooked/echo?id={session_id()}&hook=forbid")
        failed = await refusal_of(f"{base}/hooked/echo?id={session_id()}&hook=boom")
    # The hook's own answer, as it made it, with the route's response rules and the request id.
    assert answered.status_code == 403
    assert answered.body == b"no sockets today"
    assert answered.headers["x-rule"] == "after-hook"
    assert "x-request-id" in answered.headers
    # A gateway error raised by the hook: the gateway's JSON error.
    assert forbidden.status_code == 403
    assert json.loads(forbidden.body)["error"] == "forbidden"
    assert json.loads(forbidden.body)["detail"] == "no sockets for you"
    # Any other exception: 500 internal_error, without its text.
    assert failed.status_code == 500
    body = json.loads(failed.body)
    assert body["error"] == "internal_error"
    assert body["request_id"] == failed.headers["x-request-id"]
    assert b"secret" not in failed.body
    assert wa.handshakes() == 0


@pytest.mark.parametrize(("hook", "code"), [("refuse", 1008), ("forbid", 1008), ("boom", 1011)])
async def test_without_the_http_response_extension_a_hooks_refusal_is_a_close(
    wa: WsUpstream, hook: str, code: int
) -> None:
    gw = Gateway(transform_config(wa.url), hooks=HOOKS)
    client = _FakeClient()
    client.scope["path"] = "/hooked/echo"
    client.scope["raw_path"] = b"/hooked/echo"
    client.scope["query_string"] = f"id={session_id()}&hook={hook}".encode()
    await gw(client.scope, client.receive, client.send)
    assert client.sent == [{"type": "websocket.close", "code": code}]
    assert wa.handshakes() == 0


async def test_a_hooks_handshake_headers_do_not_reach_the_upstream(wa: WsUpstream) -> None:
    with gateway(transform_config(wa.url), hooks=HOOKS) as base:
        info, accepted = await info_of(
            f"{base}/hooked/echo?id={session_id()}&hook=handshake", subprotocols=["chat.v1"]
        )
    (key,) = header(info, "sec-websocket-key")
    assert key != "dGhlIHNhbXBsZSBub25jZQ=="
    assert header(info, "sec-websocket-protocol") == ["chat.v1"]
    assert accepted.headers["sec-websocket-protocol"] == "chat.v1"


async def test_a_hook_answering_101_is_a_hook_failure(wa: WsUpstream) -> None:
    with gateway(transform_config(wa.url), hooks=HOOKS) as base:
        failed = await refusal_of(f"{base}/hooked/echo?id={session_id()}&hook=101")
    assert failed.status_code == 500
    assert json.loads(failed.body)["error"] == "internal_error"
    assert wa.handshakes() == 0


@pytest.mark.parametrize("kind", ["request_headers", "response_headers"])
def test_header_rules_on_the_handshakes_own_headers_are_config_errors(kind: str) -> None:
    config = transform_config("http://127.0.0.1:9")
    config["routes"][0][kind] = {"set": {"Sec-WebSocket-Protocol": "chat.v9"}}
    with pytest.raises(ConfigError) as caught:
        load_config(config)
    assert caught.value.path == f"routes[0].{kind}.set.sec-websocket-protocol"
    assert "own header" in str(caught.value)
