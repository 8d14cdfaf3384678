"""The `asgi-gateway` command: `serve` a config file with uvicorn, or `check` it."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._config import GatewayConfig, load_config
from ._exceptions import ConfigError

__all__ = ["main"]

_CONFIG_ENV = "ASGI_GATEWAY_CONFIG"
_LOGGING_ENV = "ASGI_GATEWAY_LOGGING"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asgi-gateway", description="An API gateway on ASGI.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a config file with uvicorn")
    serve.add_argument("config", help="path to a .toml, .yaml, .yml or .json config")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    serve.add_argument(
        "--log-level", default="info", help="log level (default: info: one access line a request)"
    )
    serve.add_argument(
        "--log-format", choices=("text", "json"), default="text", help="gateway log lines as text or JSON"
    )
    serve.add_argument("--no-access-log", action="store_true", help="do not log a line per proxied request")
    check = commands.add_parser("check", help="validate a config file and print its routes")
    check.add_argument("config", help="path to a .toml, .yaml, .yml or .json config")
    return parser


def describe(config: GatewayConfig) -> str:
    """A human summary of the routes and upstreams."""
    lines = ["routes:"]
    for route in config.routes:
        methods = ",".join(route.methods) if route.methods else "*"
        host = f" host={route.host}" if route.host else ""
        strip = " strip_prefix" if route.strip_prefix else ""
        lines.append(f"  {methods:<10} {route.path:<24} -> {route.upstream}{host}{strip}")
    lines.append("upstreams:")
    for name, upstream in config.upstreams.items():
        extras: list[str] = [upstream.balancer]
        if upstream.hash_on:
            extras.append(f"hash_on={upstream.hash_on}")
        if upstream.health_check:
            extras.append(
                f"health_check={upstream.health_check.path} every {upstream.health_check.interval:g}s"
            )
        extras.append(f"attempts={upstream.retry.attempts}")
        lines.append(f"  {name}: {', '.join(extras)}")
        for server in upstream.servers:
            role = " (backup)" if server.backup else ""
            lines.append(f"    {server.url} weight={server.weight}{role}")
    return "\n".join(lines)


def app_factory() -> Any:
    """The ASGI app for `serve`, built in each worker from the config path in the environment."""
    from ._middleware import Gateway
    from ._otel_setup import configure_from_environment

    _configure_logging(os.environ.get(_LOGGING_ENV, "info:text:on"))
    providers = configure_from_environment()
    app = Gateway(os.environ[_CONFIG_ENV], **providers)
    # What exists now lives as long as the process: keeping it out of the collector's
    # generations spares the full collections that otherwise show in the tail latency.
    gc.collect()
    gc.freeze()
    return app


def _configure_logging(spec: str) -> None:
    """Send the gateway's own logs (access, health, errors) to stderr, as text or JSON."""
    level_name, fmt, access = spec.split(":", 2)
    level = logging.getLevelName(level_name.upper())
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler()
    if fmt == "json":
        from ._telemetry import JsonFormatter

        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("asgi_gateway")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    logging.getLogger("asgi_gateway.access").setLevel(logging.INFO if access == "on" else logging.WARNING)


def _invalid(path: str, exc: ConfigError) -> str:
    """One line for a single error; else a count, then one indented line per error."""
    if len(exc.errors) == 1:
        return f"asgi-gateway: invalid config {path}: {exc}"
    lines = (f"  {where}: {message}" if where else f"  {message}" for where, message in exc.errors)
    return "\n".join((f"asgi-gateway: invalid config {path}: {len(exc.errors)} errors", *lines))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(_invalid(args.config, exc), file=sys.stderr)
        return 2
    if args.command == "check":
        print(f"{args.config}: OK")
        print(describe(config))
        return 0

    try:
        import uvicorn
    except ImportError:
        print("asgi-gateway: 'serve' needs uvicorn: pip install 'asgi-gateway[server]'", file=sys.stderr)
        return 2
    os.environ[_CONFIG_ENV] = os.path.abspath(args.config)
    os.environ[_LOGGING_ENV] = f"{args.log_level}:{args.log_format}:{'off' if args.no_access_log else 'on'}"
    uvicorn.run(
        "asgi_gateway._cli:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=False,
        lifespan="on",
        # The gateway applies `trusted_proxies` itself; uvicorn must not rewrite the client first.
        proxy_headers=False,
        # The upstream's Server header is relayed; uvicorn's own would make a second one.
        server_header=False,
    )
    return 0
