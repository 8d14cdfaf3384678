"""Run the example: three demo upstreams and the FastAPI gateway, in one process.

python examples/fastapi_app/main.py [--port 8000] [--config gateway.toml]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import uvicorn

sys.path.insert(0, str(Path(__file__).parent))

from app import DEMO_PORTS, build_app, demo_config
from demo_upstreams import make_upstream


async def serve(port: int, config: str | None, demo_ports: tuple[int, ...]) -> None:
    servers = [
        uvicorn.Server(
            uvicorn.Config(make_upstream(f"demo-{i + 1}"), host="127.0.0.1", port=p, log_level="warning")
        )
        for i, p in enumerate(demo_ports)
    ]
    app = build_app(config if config is not None else demo_config(demo_ports))
    # The upstream's Server header is relayed (see the README's "Headers"): uvicorn's own would
    # make a second one, so it is off here, as `asgi-gateway serve` turns it off.
    gateway = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="info", lifespan="on", server_header=False)
    )
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):
            raise SystemExit("a demo upstream could not start (is its port taken?)")
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    print(f"demo upstreams on ports {', '.join(map(str, demo_ports))}; gateway on {base}. Try:", flush=True)
    for path in ("/api/users/42", "/api/orders/7?expand=items", "/-/gateway/status", "/hello", "/"):
        print(f"  curl -s {base}{path}", flush=True)
    try:
        await gateway.serve()
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", default=None, help="a gateway config file instead of the built-in dict")
    parser.add_argument(
        "--demo-ports",
        default=",".join(map(str, DEMO_PORTS)),
        help="three ports for the demo upstreams (default: %(default)s)",
    )
    args = parser.parse_args()
    demo_ports = tuple(int(p) for p in args.demo_ports.split(","))
    if len(demo_ports) != 3:
        parser.error("--demo-ports takes three ports")
    asyncio.run(serve(args.port, args.config, demo_ports))


if __name__ == "__main__":
    main()
