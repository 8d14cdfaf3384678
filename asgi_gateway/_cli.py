"""The `asgi-gateway` command: `serve` a config file with uvicorn, or `check` it.

`serve` itself (reload on SIGHUP or --watch, the drain on SIGTERM, the workers) is in `_serve`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._config import GatewayConfig, load_config
from ._exceptions import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asgi-gateway", description="An API gateway on ASGI.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a config file with uvicorn")
    serve.add_argument("config", help="path to a .toml, .yaml, .yml or .json config")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to bind (default: 8000)")
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes (default: 1); each reloads on SIGHUP"
    )
    serve.add_argument(
        "--watch",
        action="store_true",
        help="reload the config when the file changes (needs asgi-gateway[watch])",
    )
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
        import uvicorn  # noqa: F401
    except ImportError:
        print("asgi-gateway: 'serve' needs uvicorn: pip install 'asgi-gateway[server]'", file=sys.stderr)
        return 2
    if args.watch:
        try:
            import watchfiles  # noqa: F401
        except ImportError:
            print(
                "asgi-gateway: '--watch' needs watchfiles: pip install 'asgi-gateway[watch]'", file=sys.stderr
            )
            return 2
    from ._serve import ServeOptions, serve

    return serve(
        ServeOptions(
            config_path=os.path.abspath(args.config),
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            logging=f"{args.log_level}:{args.log_format}:{'off' if args.no_access_log else 'on'}",
            watch=args.watch,
        )
    )
