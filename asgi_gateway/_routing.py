"""Routes: which upstream a request goes to, compiled once at start-up."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

from ._config import GatewayConfig, RewriteConfig, RouteConfig, _Inherit, compile_rewrite
from ._exceptions import BadRequest

__all__ = ["Rewrite", "Route", "Router", "resolve_dot_segments"]


class Rewrite:
    """A route's `rewrite`, compiled: the pattern's search, and the replacement as a bytes
    `%` template of the groups it names.

    `alone` (set by the router) says that a plain rewritten path cannot choose another
    route; `clean`, that the replacement's own text holds no byte that makes a path other
    than plain.
    """

    __slots__ = ("alone", "clean", "groups", "search", "template")

    def __init__(self, config: RewriteConfig, *, alone: bool = False) -> None:
        pattern, parts = compile_rewrite(config)
        self.search: Callable[[bytes], re.Match[bytes] | None] = pattern.search
        numbers = [
            part if isinstance(part, int) else pattern.groupindex[part]
            for part in parts
            if not isinstance(part, bytes)
        ]
        self.template = b"".join(
            part.replace(b"%", b"%%") if isinstance(part, bytes) else b"%s" for part in parts
        )
        #: The group numbers to fill the template with; None for all the pattern's groups in
        #: their order (the usual `$1`, `$1$2`), which `Match.groups` hands over at once.
        self.groups = None if numbers == list(range(1, pattern.groups + 1)) else tuple(numbers)
        literal = b"".join(part for part in parts if isinstance(part, bytes))
        self.clean = len(literal.translate(None, _NOT_PLAIN_BYTES)) == len(literal)
        self.alone = alone


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route."""

    index: int
    path: str
    upstream: str
    strip_prefix: bool
    methods: frozenset[str] | None
    host: str | None
    max_body_size: int | None
    preserve_host: bool
    max_message_size: int | None
    #: The prefix as a tuple of segments: "/api/users" -> ("api", "users").
    segments: tuple[bytes, ...]
    rewrite: Rewrite | None = None

    def accepts(self, method: str, host: str | None) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.host is None or self.host == host


def _segments(path: bytes) -> tuple[bytes, ...]:
    return tuple(part for part in path.split(b"/") if part)


def resolve_dot_segments(raw_path: bytes) -> bytes:
    """Remove "." and ".." segments (RFC 3986 5.2.4), never climbing above the root."""
    if b"/." not in raw_path and not raw_path.startswith(b"."):
        return raw_path
    out: list[bytes] = []
    parts = raw_path.split(b"/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == b".":
            if last:
                out.append(b"")
        elif part == b"..":
            if len(out) > 1:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(part)
    resolved = b"/".join(out)
    if not resolved.startswith(b"/"):
        resolved = b"/" + resolved
    return resolved


class Router:
    """First matching route wins; a match costs a few dict lookups, whatever the number of routes."""

    def __init__(self, config: GatewayConfig) -> None:
        routes = [_compile(index, spec, config) for index, spec in enumerate(config.routes)]
        for index, spec in enumerate(config.routes):
            if spec.rewrite is not None:
                routes[index] = dataclasses.replace(
                    routes[index], rewrite=Rewrite(spec.rewrite, alone=_alone(routes[index], routes))
                )
        self.routes: Sequence[Route] = tuple(routes)
        table: dict[tuple[bytes, ...], list[Route]] = {}
        for route in routes:
            table.setdefault(route.segments, []).append(route)
        self._table = {key: tuple(value) for key, value in table.items()}
        self._max_depth = max((len(key) for key in table), default=0)
        #: The same table keyed by the prefix as it appears in a plain path: b"", b"/api/users".
        self._prefixes = {b"".join(b"/" + part for part in key): value for key, value in self._table.items()}
        if any(route.rewrite is not None for route in routes):
            # Only a config with rewrites pays for looking at them.
            self.match = self._match_rewriting  # type: ignore[method-assign]

    def _lookup(self, segments: Sequence[bytes], method: str, host: str | None) -> Route | None:
        best: Route | None = None
        table = self._table
        for depth in range(min(len(segments), self._max_depth) + 1):
            candidates = table.get(tuple(segments[:depth]))
            if candidates is None:
                continue
            for route in candidates:
                if (best is None or route.index < best.index) and route.accepts(method, host):
                    best = route
                    break
        return best

    def match(self, method: str, host: str | None, raw_path: bytes) -> tuple[Route, bytes] | None:
        """The route for this request and the raw path to send upstream, or None.

        Raises `BadRequest` when the path is ambiguous: when decoding it differently
        (percent-decoding before splitting, decoding twice, reading backslashes as
        slashes) would pick a different route.
        """
        # The usual path, which every way of reading it agrees on (no dot or empty segment,
        # no encoding, backslash or ";"), has its prefixes looked up as they are, with no
        # splitting. (`find` and one `translate`, not `in`: on Python 3.11 `bytes in bytes`
        # tries the needle as an integer first, and the TypeError it raises and clears
        # costs more than the search.)
        if (
            raw_path[:1] == b"/"
            and raw_path.find(b"/.") < 0
            and raw_path.find(b"//") < 0
            and len(raw_path.translate(None, _NOT_PLAIN_BYTES)) == len(raw_path)
        ):
            return self._match_plain(method, host, raw_path)
        return self._match_general(method, host, raw_path)

    def _match_rewriting(self, method: str, host: str | None, raw_path: bytes) -> tuple[Route, bytes] | None:
        """`match`, then the route's `rewrite` on the path it sends upstream."""
        # `match`'s own test, written out: a route without a rewrite costs no call more here.
        plain = (
            raw_path[:1] == b"/"
            and raw_path.find(b"/.") < 0
            and raw_path.find(b"//") < 0
            and len(raw_path.translate(None, _NOT_PLAIN_BYTES)) == len(raw_path)
        )
        found = (
            self._match_plain(method, host, raw_path)
            if plain
            else self._match_general(method, host, raw_path)
        )
        if found is None:
            return None
        route, path = found
        rewrite = route.rewrite
        if rewrite is None:
            return found
        hit = rewrite.search(path)
        if hit is None:
            return found
        # A bytes template, not `re`'s own expansion (`subn` with a template), which parses
        # the template again on every call.
        numbers = rewrite.groups
        replaced = rewrite.template % (
            hit.groups(b"") if numbers is None else tuple([hit.group(n) or b"" for n in numbers])
        )
        start, end = hit.span()
        rewritten = replaced if start == 0 and end == len(path) else path[:start] + replaced + path[end:]
        if (
            rewrite.alone
            and rewritten[:1] == b"/"
            and rewritten.find(b"/.") < 0
            and rewritten.find(b"//") < 0
            # From a plain path, the groups hold none of these bytes.
            and (
                (plain and rewrite.clean)
                or len(rewritten.translate(None, _NOT_PLAIN_BYTES)) == len(rewritten)
            )
        ):
            return route, rewritten
        # The result goes through the same rules as a client's path (dot segments, empty
        # segments, encodings read differently), as the path the client would have had to
        # send for it: it must route to this same route, or the upstream would see a path
        # of another route's (or of none).
        as_sent = (
            b"".join(b"/" + part for part in route.segments) + rewritten if route.strip_prefix else rewritten
        )
        again = Router.match(self, method, host, as_sent)
        if again is None or again[0] is not route:
            raise BadRequest("the rewritten path would leave its route")
        return again

    def _match_general(self, method: str, host: str | None, raw_path: bytes) -> tuple[Route, bytes] | None:
        """`match` for any path: dot segments resolved, segments decoded, readings compared."""
        if raw_path == b"*":
            # The asterisk form (`OPTIONS *`, RFC 9112 3.2.4) is about the server as a whole:
            # no route is, so it goes to the app.
            return None
        path = resolve_dot_segments(raw_path)
        if not path.startswith(b"/"):
            raise BadRequest("the request path must start with '/'")
        ambiguous = b"%" in path or b"\\" in path or b";" in path
        if b"//" in path:
            # Many servers and frameworks read empty segments away, as nginx's merge_slashes
            # does: "//api/users" is "/api/users" to them. When that reading picks another
            # route, it is the one taken, and the path goes upstream merged, so an upstream
            # never sees a path of another route than the one the gateway applied.
            merged = _merge_slashes(path)
            if self._decoded_lookup(merged, method, host, ambiguous) is not self._decoded_lookup(
                path, method, host, ambiguous
            ):
                path = merged
        raw_segments = path.split(b"/")[1:]
        if ambiguous:
            segments = [unquote_to_bytes(part) for part in raw_segments]
        else:
            segments = raw_segments
        route = self._lookup(segments, method, host)
        if ambiguous:
            for variant in _variants(path):
                parts = resolve_dot_segments(variant).split(b"/")[1:]
                other = self._lookup([unquote_to_bytes(part) for part in parts], method, host)
                if other is not route:
                    raise BadRequest(
                        "the request path is ambiguous: encoded characters would change its route"
                    )
        if route is None:
            return None
        if route.strip_prefix and route.segments:
            rest = b"/".join(raw_segments[len(route.segments) :])
            path = b"/" + rest
        return route, path

    def _decoded_lookup(self, path: bytes, method: str, host: str | None, decode: bool) -> Route | None:
        parts = path.split(b"/")[1:]
        return self._lookup([unquote_to_bytes(part) for part in parts] if decode else parts, method, host)

    def _match_plain(self, method: str, host: str | None, path: bytes) -> tuple[Route, bytes] | None:
        """`match` for a path with no empty, dot or encoded segment (the same answer, faster)."""
        prefixes = self._prefixes
        best: Route | None = None
        best_prefix = b""
        prefix = b""
        end = 0
        for _ in range(self._max_depth + 1):
            candidates = prefixes.get(prefix)
            if candidates is not None:
                for route in candidates:
                    if best is not None and route.index > best.index:
                        break
                    if route.accepts(method, host):
                        best, best_prefix = route, prefix
                        break
            if end < 0:
                break
            end = path.find(b"/", end + 1)
            prefix = path if end < 0 else path[:end]
        if best is None:
            return None
        if best.strip_prefix and best_prefix:
            return best, path[len(best_prefix) :] or b"/"
        return best, path


#: The bytes that make a path other than plain besides a dot or empty segment: an encoding,
#: a backslash, a ";".
_NOT_PLAIN_BYTES: Final = b"%\\;"


def _alone(route: Route, routes: Sequence[Route]) -> bool:
    """Whether `route`'s rewritten path, when plain, cannot choose another route: the path
    keeps its prefix (stripped, it is put back; or the prefix is `/`) and no route's prefix
    lies below its own (the prefixes above match the path before and after alike).
    """
    return (route.strip_prefix or not route.segments) and not any(
        len(other.segments) > len(route.segments) and other.segments[: len(route.segments)] == route.segments
        for other in routes
    )


def _merge_slashes(path: bytes) -> bytes:
    while b"//" in path:
        path = path.replace(b"//", b"/")
    return path


def _variants(path: bytes) -> list[bytes]:
    """Other ways servers have been known to read `path`."""
    once = unquote_to_bytes(path)
    twice = unquote_to_bytes(once)
    readings = [once, twice, path.replace(b"\\", b"/"), once.replace(b"\\", b"/"), twice.replace(b"\\", b"/")]
    if b";" in path:
        # Servlet containers drop ";params" from each segment: "/a/..;/b" is "/b" to them.
        readings += [_without_params(reading) for reading in (path, *readings)]
    return readings


def _without_params(path: bytes) -> bytes:
    return b"/".join(segment.split(b";", 1)[0] for segment in path.split(b"/"))


def _compile(index: int, spec: RouteConfig, config: GatewayConfig) -> Route:
    max_body_size = config.max_body_size if isinstance(spec.max_body_size, _Inherit) else spec.max_body_size
    preserve_host = config.preserve_host if isinstance(spec.preserve_host, _Inherit) else spec.preserve_host
    max_message_size = (
        config.max_message_size if isinstance(spec.max_message_size, _Inherit) else spec.max_message_size
    )
    return Route(
        index=index,
        path=spec.path,
        upstream=spec.upstream,
        strip_prefix=spec.strip_prefix,
        methods=frozenset(m.upper() for m in spec.methods) if spec.methods is not None else None,
        host=spec.host.lower().rstrip(".") if spec.host else None,
        max_body_size=max_body_size,
        preserve_host=preserve_host,
        max_message_size=max_message_size,
        segments=_segments(spec.path.encode("utf-8")),
    )
