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

from app import DEMO_PORTS, build_app  # noqa: E402
from demo_upstreams import make_upstream  # noqa: E402


async def serve(port: int, config: str | None) -> None:
    servers = [
        uvicorn.Server(uvicorn.Config(make_upstream(f"demo-{i + 1}"), host="127.0.0.1", port=p, log_level="warning"))
        for i, p in enumerate(DEMO_PORTS)
    ]
    gateway = uvicorn.Server(
        uvicorn.Config(build_app(config), host="127.0.0.1", port=port, log_level="info", lifespan="on")
    )
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    while not all(server.started for server in servers):
        if any(task.done() for task in tasks):
            raise SystemExit("a demo upstream could not start (is its port taken?)")
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    print(f"demo upstreams on ports {', '.join(map(str, DEMO_PORTS))}; gateway on {base}. Try:")
    for path in ("/api/users/42", "/api/orders/7?expand=items", "/-/gateway/status", "/hello", "/"):
        print(f"  curl -s {base}{path}")
    try:
        await gateway.serve()
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--config", default=None, help="a gateway config file instead of the built-in dict")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.config))


if __name__ == "__main__":
    main()
