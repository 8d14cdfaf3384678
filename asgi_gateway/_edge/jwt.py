"""JWT verification (PyJWT with `cryptography`) and a JWKS cache refreshed in the background.

A token is checked for its algorithm (the route's allow-list; `none` is never on it), its
signature with a key of the algorithm's own family (a public key is never an HMAC secret),
and `exp`, `nbf`, `iss`, `aud` with the route's leeway.

JWKS are fetched by a background task, never by a request whose key is cached: at start-up,
again when their `Cache-Control: max-age` runs out (kept within bounds), and, at most once
per 30 s, when a token names a `kid` the set does not have (a key rotation). Only a request
carrying such a `kid` waits for that fetch, within its timeout.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc

from .._exceptions import ConfigError

if TYPE_CHECKING:
    import httpx
    from jwt import PyJWK

    from .._config import JwtConfig

__all__ = [
    "JwksCache",
    "JwtVerifier",
    "KeyUnknown",
    "TokenRefused",
    "bearer_token",
    "claim_header_value",
    "import_jwt",
]

logger = logging.getLogger("asgi_gateway")


def import_jwt(where: str) -> Any:
    """PyJWT, or a `ConfigError` at `where` telling how to install it."""
    try:
        import jwt
        from cryptography.hazmat.primitives import serialization  # noqa: F401 - PyJWT[crypto]
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigError(
            where, "JWT authentication needs the 'jwt' extra: pip install 'asgi-gateway[jwt]'"
        ) from None
    return jwt


class TokenRefused(Exception):
    """The token does not pass. `reason` is a short name for span attributes and logs."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class KeyUnknown(TokenRefused):
    """No key of the set verifies tokens with this `kid` (yet)."""

    def __init__(self, kid: str | None) -> None:
        super().__init__(
            "unknown_key", f"no key for kid {kid!r}" if kid is not None else "no key for the token"
        )
        self.kid = kid


def _header(token: str) -> dict[str, Any]:
    """The token's JOSE header, decoded without trusting anything in it."""
    head, dot, _ = token.partition(".")
    if not dot or not head or len(head) > 4096:
        raise TokenRefused("invalid", "the token is not a JWT")
    try:
        header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    except (ValueError, binascii.Error):
        raise TokenRefused("invalid", "the token's header is not valid JSON") from None
    if not isinstance(header, dict):
        raise TokenRefused("invalid", "the token's header is not a JSON object")
    return header


class _StaticKeys:
    """One key, from `public_key` or `secret`."""

    def __init__(self, key: Any) -> None:
        self.key = key

    def find(self, kid: str | None, algorithm: str) -> Sequence[Any]:
        return (self.key,)


class JwksCache:
    """The keys of one JWKS URL, by `kid`, fetched by `run()` in the background.

    `find()` only reads what is cached; `refetch()` asks the background task for a fetch
    (at most one per `refetch_interval` seconds for unknown `kid`s) and waits for it.
    """

    #: Bounds on how long a fetched set is kept, whatever `Cache-Control` says, and the
    #: time without one.
    MIN_TTL: Final = 60.0
    MAX_TTL: Final = 86400.0
    DEFAULT_TTL: Final = 300.0
    #: After a failed fetch, the next tries come sooner: 1 s, 2 s, 4 s ... up to this.
    MAX_RETRY: Final = 60.0

    def __init__(self, url: str, *, timeout: float = 5.0, refetch_interval: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self.refetch_interval = refetch_interval
        self.keys: dict[str, PyJWK] = {}
        #: Keys by algorithm, for tokens that name no `kid`.
        self._by_algorithm: dict[str, list[PyJWK]] = {}
        self.fetched_at: float | None = None
        #: Until when the set last fetched may be kept (monotonic time).
        self.fresh_until: float | None = None
        self.fetches = 0
        self._forced_at: float | None = None
        self._wake: anyio.Event | None = None
        self._done: anyio.Event | None = None
        #: Background loops running now: a reload's new one starts before the old one has
        #: finished unwinding.
        self._runs = 0
        self._lock: anyio.Lock | None = None
        #: Set once the fetch asked for by an unknown `kid` is over.
        self._pending: anyio.Event | None = None

    def find(self, kid: str | None, algorithm: str) -> Sequence[PyJWK]:
        if kid is not None:
            key = self.keys.get(kid)
            return (key,) if key is not None else ()
        return self._by_algorithm.get(algorithm, ())

    # -- fetching --

    async def fetch(self, client: httpx.AsyncClient) -> float:
        """Fetch the set once; returns how long to keep it. Raises on any failure."""
        self.fetches += 1
        with anyio.fail_after(self.timeout):
            response = await client.get(self.url, headers={"accept": "application/json"})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        keys = _parse_jwks(response.json())
        self.keys = {key.key_id: key for key in keys if key.key_id is not None}
        by_algorithm: dict[str, list[PyJWK]] = {}
        for key in keys:
            by_algorithm.setdefault(key.algorithm_name, []).append(key)
        self._by_algorithm = by_algorithm
        self.fetched_at = time.monotonic()
        ttl = _ttl(response.headers.get("cache-control"), self.MIN_TTL, self.MAX_TTL, self.DEFAULT_TTL)
        self.fresh_until = self.fetched_at + ttl
        return ttl

    async def _fetch_logged(self, client: httpx.AsyncClient) -> float | None:
        try:
            return await self.fetch(client)
        except Exception as exc:
            logger.warning(
                "JWKS fetch from %s failed: %s (the keys fetched before stay in use)",
                self.url,
                str(exc) or type(exc).__name__,
            )
            return None
        finally:
            done, self._done = self._done, anyio.Event()
            if done is not None:
                done.set()

    async def run(
        self,
        client: httpx.AsyncClient,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Fetch now (unless the set is still fresh), tell `task_status`, then keep the set
        fresh until cancelled.

        A set still fresh is kept: a reload hands the running caches to the new config's
        background work, which must not fetch them all again.
        """
        self._wake = anyio.Event()
        self._done = anyio.Event()
        self._runs += 1
        try:
            now = time.monotonic()
            ttl: float | None
            if self.fresh_until is not None and now < self.fresh_until:
                ttl = self.fresh_until - now
            else:
                ttl = await self._fetch_logged(client)
            task_status.started()
            failures = 0 if ttl is not None else 1
            while True:
                if ttl is None:
                    delay = min(self.MAX_RETRY, 2.0 ** (failures - 1))
                else:
                    delay = ttl
                with anyio.move_on_after(delay):
                    await self._wake.wait()
                self._wake = anyio.Event()
                ttl = await self._fetch_logged(client)
                failures = 0 if ttl is not None else failures + 1
        finally:
            self._runs -= 1

    async def refetch(self) -> bool:
        """For a token whose key is not cached: fetch again if allowed, and wait for it.

        Returns False when no fetch was allowed (one was made less than `refetch_interval`
        ago and is over); True when the caller should look at the cache again. Requests that
        come while such a fetch is under way wait for that same fetch.
        """
        now = time.monotonic()
        if self._forced_at is not None and now - self._forced_at < self.refetch_interval:
            pending = self._pending
            if pending is None:
                return False
            with anyio.move_on_after(self.timeout):
                await pending.wait()
            return True
        self._forced_at = now
        if self._runs and self._wake is not None and self._done is not None:
            pending = self._pending = self._done
            self._wake.set()
            with anyio.move_on_after(self.timeout):
                await pending.wait()
        else:
            # No background task (an app served without a lifespan): this request fetches.
            pending = self._pending = anyio.Event()
            try:
                await self._fetch_inline()
            finally:
                pending.set()
        if self._pending is pending:
            self._pending = None
        return True

    async def _fetch_inline(self) -> None:
        import httpx

        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock, httpx.AsyncClient(timeout=self.timeout) as client:
            await self._fetch_logged(client)


def _parse_jwks(data: Any) -> list[PyJWK]:
    import jwt

    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise ValueError("not a JWK set (no 'keys' list)")
    keys: list[PyJWK] = []
    for item in data["keys"]:
        if not isinstance(item, Mapping):
            continue
        # A symmetric key in a public set would turn its secret public; keys for encryption
        # never sign.
        if item.get("kty") == "oct" or item.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(dict(item))
        except jwt.PyJWTError as exc:
            logger.debug("JWKS key %r skipped: %s", item.get("kid"), exc)
            continue
        if key.Algorithm.check_key_length(key.Algorithm.prepare_key(key.key)):
            logger.warning("JWKS key %r skipped: shorter than its algorithm needs", item.get("kid"))
            continue
        keys.append(key)
    return keys


_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)")


def _ttl(cache_control: str | None, low: float, high: float, default: float) -> float:
    if not cache_control:
        return default
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return low
    match = _MAX_AGE.search(lowered)
    if match is None:
        return default
    return min(high, max(low, float(match.group(1))))


_REFUSALS: Final = (
    ("ExpiredSignatureError", "expired", "the token has expired"),
    ("ImmatureSignatureError", "not_yet_valid", "the token is not valid yet"),
    ("InvalidIssuerError", "wrong_issuer", "the token's issuer is not accepted"),
    ("InvalidAudienceError", "wrong_audience", "the token's audience is not accepted"),
    ("InvalidSignatureError", "bad_signature", "the token's signature does not verify"),
    ("InvalidAlgorithmError", "bad_algorithm", "the token's algorithm is not accepted"),
    ("InvalidKeyError", "bad_algorithm", "the token's algorithm does not fit the key"),
)


class JwtVerifier:
    """Verifies a route's tokens: `verify(token) -> claims`, or `TokenRefused`.

    Built from the route's `auth.jwt`; a bad `public_key` or `secret` is a `ConfigError`
    here, at build time.
    """

    def __init__(self, config: JwtConfig, where: str) -> None:
        jwt = import_jwt(where)
        self._jwt = jwt
        self.config = config
        self.algorithms = tuple(config.algorithms)
        self._allowed = frozenset(config.algorithms)
        self.jwks: JwksCache | None = None
        self.keys: JwksCache | _StaticKeys
        if config.jwks_url is not None:
            self.jwks = self.keys = JwksCache(config.jwks_url)
        elif config.public_key is not None:
            self.keys = _StaticKeys(_public_key(config.public_key, self.algorithms, f"{where}.public_key"))
        else:
            assert config.secret is not None
            secret = config.secret.encode()
            for algorithm in self.algorithms:
                # RFC 7518 3.2: an HMAC key at least as long as the hash's output.
                needed = int(algorithm[2:]) // 8
                if len(secret) < needed:
                    raise ConfigError(
                        f"{where}.secret", f"{algorithm} needs a secret of at least {needed} bytes"
                    )
            self.keys = _StaticKeys(secret)
        self._options: dict[str, Any] = {
            "verify_aud": config.audience is not None,
            "verify_iss": config.issuer is not None,
            "enforce_minimum_key_length": True,
        }
        self._audience = list(config.audience) if config.audience is not None else None
        self._errors = tuple((getattr(jwt, name), reason, text) for name, reason, text in _REFUSALS)

    def verify(self, token: str) -> dict[str, Any]:
        header = _header(token)
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self._allowed:
            raise TokenRefused("bad_algorithm", f"the token's algorithm {algorithm!r} is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise TokenRefused("invalid", "the token's kid is not a string")
        candidates = self.keys.find(kid, algorithm)
        if not candidates:
            raise KeyUnknown(kid)
        refused: TokenRefused | None = None
        for key in candidates:
            try:
                claims: dict[str, Any] = self._jwt.decode(
                    token,
                    key,
                    algorithms=self.algorithms,
                    issuer=self.config.issuer,
                    audience=self._audience,
                    leeway=self.config.leeway,
                    options=self._options,
                )
                return claims
            except self._jwt.PyJWTError as exc:
                refused = self._refusal(exc)
                if refused.reason != "bad_signature":
                    break  # the claims, not the key: another key would not change that
        assert refused is not None
        raise refused

    def _refusal(self, exc: Exception) -> TokenRefused:
        for kind, reason, text in self._errors:
            if isinstance(exc, kind):
                return TokenRefused(reason, text)
        return TokenRefused("invalid", f"the token is not valid: {exc}")


_FAMILIES: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_CURVES: Final = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def _public_key(pem: str, algorithms: Sequence[str], where: str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ConfigError(where, f"is not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        kind = "RSA"
        if key.key_size < 2048:
            raise ConfigError(where, f"an RSA key of {key.key_size} bits is too short (at least 2048)")
    elif isinstance(key, ec.EllipticCurvePublicKey):
        kind = "EC"
    elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        kind = "OKP"
    else:
        raise ConfigError(where, f"a {type(key).__name__} cannot verify JWTs")
    for algorithm in algorithms:
        if _FAMILIES.get(algorithm[:2]) != kind:
            raise ConfigError(where, f"an {kind} key cannot verify {algorithm} tokens")
        if (
            kind == "EC"
            and isinstance(key, ec.EllipticCurvePublicKey)
            and key.curve.name != _CURVES[algorithm]
        ):
            raise ConfigError(where, f"a {key.curve.name} key cannot verify {algorithm} tokens")
    return key


def bearer_token(value: bytes) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` value, or None for any other scheme."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    token = token.strip()
    if not token or len(token) > 16384:
        return None
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        return None


def claim_header_value(value: Any) -> bytes | None:
    """A claim as a header value: strings as they are, anything else as JSON; None if unsafe."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    data = text.encode("utf-8")
    if any(c < 0x20 or c == 0x7F for c in data) or len(data) > 8192:
        return None
    return data
