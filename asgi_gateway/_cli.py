"""The `asgi-gateway` command: `serve` a config file with uvicorn, or `check` it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._config import GatewayConfig, load_config
from ._exceptions import ConfigError

__all__ = ["main"]

_CONFIG_ENV = "ASGI_GATEWAY_CONFIG"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asgi-gateway", description="An API gateway on ASGI.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a config file with uvicorn")
    serve.add_argument("config", help="path to a .toml, .yaml, .yml or .json config")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default: 1)")
    serve.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
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

    providers = configure_from_environment()
    return Gateway(os.environ[_CONFIG_ENV], **providers)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"asgi-gateway: invalid config {args.config}: {exc}", file=sys.stderr)
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
    uvicorn.run(
        "asgi_gateway._cli:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        lifespan="on",
        # The gateway applies `trusted_proxies` itself; uvicorn must not rewrite the client first.
        proxy_headers=False,
    )
    return 0
