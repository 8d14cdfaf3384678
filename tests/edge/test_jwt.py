"""JWT verification and the JWKS cache, against real keys and a real JWKS server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest
from edge.tokens import SECRET, JwksServer, jwk, pem, token, unsigned

from asgi_gateway import ConfigError
from asgi_gateway._config import JwtConfig, load_config
from asgi_gateway._edge.jwt import JwksCache, JwtVerifier, KeyUnknown, TokenRefused, _ttl

pytestmark = pytest.mark.anyio


def verifier(**config: Any) -> JwtVerifier:
    return JwtVerifier(JwtConfig(**config), "routes[0].auth.jwt")


def refused(check: JwtVerifier, value: str) -> str:
    with pytest.raises(TokenRefused) as info:
        check.verify(value)
    return info.value.reason


def test_a_valid_token_gives_its_claims(rsa_keys: Any) -> None:
    check = verifier(public_key=pem(rsa_keys[0]), issuer="https://issuer/", audience=("api",))
    claims = check.verify(token(rsa_keys[0], iss="https://issuer/", aud="api", role="admin"))
    assert claims["sub"] == "user-1" and claims["role"] == "admin"


def test_each_bad_token_is_refused_with_its_reason(rsa_keys: Any) -> None:
    check = verifier(public_key=pem(rsa_keys[0]), issuer="https://issuer/", audience=("api",), leeway=5)
    good = {"iss": "https://issuer/", "aud": "api"}
    now = int(time.time())
    assert refused(check, token(rsa_keys[0], **good, exp=now - 60)) == "expired"
    assert refused(check, token(rsa_keys[0], **good, nbf=now + 60)) == "not_yet_valid"
    assert refused(check, token(rsa_keys[0], iss="https://other/", aud="api")) == "wrong_issuer"
    assert refused(check, token(rsa_keys[0], iss="https://issuer/", aud="other")) == "wrong_audience"
    assert refused(check, token(rsa_keys[1], **good)) == "bad_signature"
    assert refused(check, unsigned(**good)) == "bad_algorithm"
    assert refused(check, "not-a-token") == "invalid"
    assert refused(check, "eyJhbGciOi.e30.") == "invalid"
    # Within the leeway, a token just expired or just not yet valid still passes.
    check.verify(token(rsa_keys[0], **good, exp=now - 2))
    check.verify(token(rsa_keys[0], **good, nbf=now + 2))


def test_an_rs256_key_used_as_an_hmac_secret_is_refused(rsa_keys: Any) -> None:
    # The HS/RS confusion attack: the public key (which anyone has) signs an HS256 token.
    public = pem(rsa_keys[0])
    forged = _hs256_with_raw_secret(public.encode())
    check = verifier(public_key=public)
    assert refused(check, forged) == "bad_algorithm"
    with pytest.raises(ConfigError, match="need a secret"):
        load_config(
            {
                "routes": [
                    {
                        "path": "/",
                        "upstream": "u",
                        "auth": {"jwt": {"public_key": public, "algorithms": ["RS256", "HS256"]}},
                    }
                ],
                "upstreams": {"u": {"servers": ["http://127.0.0.1:1"]}},
            }
        )


def _hs256_with_raw_secret(secret: bytes) -> str:
    # PyJWT itself refuses a PEM as an HMAC secret; an attacker signs by hand.
    import base64
    import hashlib
    import hmac
    import json

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signing = (
        part(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + b"."
        + part(json.dumps({"sub": "attacker", "exp": int(time.time()) + 300}).encode())
    )
    return (signing + b"." + part(hmac.new(secret, signing, hashlib.sha256).digest())).decode()


def test_a_secret_verifies_hmac_tokens_only() -> None:
    check = verifier(secret=SECRET, algorithms=("HS256",))
    assert check.verify(token(SECRET, "HS256"))["sub"] == "user-1"
    assert refused(check, token(SECRET, "HS512")) == "bad_algorithm"
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        verifier(secret="short", algorithms=("HS256",))


def test_a_public_key_must_fit_its_algorithms(rsa_keys: Any, ec_key: Any) -> None:
    with pytest.raises(ConfigError, match="cannot verify ES256"):
        verifier(public_key=pem(rsa_keys[0]), algorithms=("ES256",))
    with pytest.raises(ConfigError, match="is not a PEM public key"):
        verifier(public_key="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    check = verifier(public_key=pem(ec_key), algorithms=("ES256",))
    assert check.verify(token(ec_key, "ES256"))["sub"] == "user-1"


def test_cache_control_bounds() -> None:
    assert _ttl(None, 60, 86400, 300) == 300
    assert _ttl("public, max-age=600", 60, 86400, 300) == 600
    assert _ttl("max-age=1", 60, 86400, 300) == 60
    assert _ttl("max-age=99999999", 60, 86400, 300) == 86400
    assert _ttl("no-store", 60, 86400, 300) == 60


@pytest.fixture
def jwks(serve: Callable[..., str], rsa_keys: Any) -> Iterator[tuple[JwksServer, JwtVerifier, JwksCache]]:
    """A real JWKS server publishing k1, and a verifier whose cache reads it."""
    state = JwksServer()
    state.keys = [jwk(rsa_keys[0], "k1")]
    check = verifier(jwks_url=f"{serve(state.app())}/jwks.json")
    assert check.jwks is not None
    try:
        yield state, check, check.jwks
    finally:
        state.hanging.clear()


async def test_jwks_rotation_loses_no_valid_request(
    jwks: tuple[JwksServer, JwtVerifier, JwksCache], rsa_keys: Any
) -> None:
    state, check, cache = jwks
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        await tg.start(cache.run, client)
        assert check.verify(token(rsa_keys[0], kid="k1"))["sub"] == "user-1"
        # The issuer publishes k2 next to k1 and starts signing with it.
        state.keys = [jwk(rsa_keys[0], "k1"), jwk(rsa_keys[1], "k2")]
        new = token(rsa_keys[1], kid="k2")
        with pytest.raises(KeyUnknown):
            check.verify(new)
        fetches = state.requests
        assert await cache.refetch()
        assert state.requests == fetches + 1
        assert check.verify(new)["sub"] == "user-1"
        # At most one refetch per 30 s for unknown kids: another one is not fetched.
        assert not await cache.refetch()
        assert state.requests == fetches + 1
        with pytest.raises(KeyUnknown):
            check.verify(token(rsa_keys[2], kid="k3"))
        tg.cancel_scope.cancel()


async def test_a_hanging_jwks_server_does_not_delay_cached_keys(
    jwks: tuple[JwksServer, JwtVerifier, JwksCache], rsa_keys: Any
) -> None:
    state, check, cache = jwks
    cache.timeout = 1.0
    async with httpx.AsyncClient() as client, anyio.create_task_group() as tg:
        await tg.start(cache.run, client)
        state.hanging.set()
        refetching = anyio.Event()

        async def unknown_kid() -> None:
            refetching.set()
            await cache.refetch()  # the background fetch hangs; this waits for it, bounded

        tg.start_soon(unknown_kid)
        await refetching.wait()
        await anyio.wait_all_tasks_blocked()
        start = time.monotonic()
        for _ in range(50):
            check.verify(token(rsa_keys[0], kid="k1"))
        assert time.monotonic() - start < 0.5
        state.hanging.clear()
        tg.cancel_scope.cancel()
