"""Tokens, keys and a real JWKS server (Starlette under uvicorn) for the edge tests."""

from __future__ import annotations

import base64
import json
import threading
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SECRET = "s3cret-" + "x" * 60


def pem(private_key: Any) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def token(key: Any, algorithm: str = "RS256", kid: str | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": "user-1", "iat": now, "exp": now + 300}
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not None}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers)


def unsigned(**claims: Any) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'sub': 'user-1', 'exp': now + 300, **claims})}."


def jwk(private_key: Any, kid: str, algorithm: str = "RS256") -> dict[str, Any]:
    algorithms = jwt.algorithms.get_default_algorithms()
    data: dict[str, Any] = json.loads(algorithms[algorithm].to_jwk(private_key.public_key()))
    data.update({"kid": kid, "alg": algorithm, "use": "sig"})
    return data


class JwksServer:
    """The app's state: the keys it serves, a Cache-Control, and a switch that hangs it."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.cache_control = "max-age=300"
        self.requests = 0
        self.hanging = threading.Event()

    def app(self) -> Starlette:
        async def jwks(request: Request) -> JSONResponse:
            import anyio

            self.requests += 1
            deadline = time.monotonic() + 20
            while self.hanging.is_set() and time.monotonic() < deadline:
                await anyio.sleep(0.02)
            return JSONResponse({"keys": list(self.keys)}, headers={"cache-control": self.cache_control})

        return Starlette(routes=[Route("/jwks.json", jwks)])
