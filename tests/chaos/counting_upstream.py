"""`tests/upstream_app.py` that also counts its requests in a file, so the count survives SIGKILL.

Run as `python tests/chaos/counting_upstream.py --port PORT` with `CHAOS_COUNT_FILE` set: one byte
is appended (O_APPEND, before the request is handled) for every non-admin request, so the
file's size is the number of requests this server received over all its lives.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import upstream_app

_FD = os.open(os.environ["CHAOS_COUNT_FILE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)


async def app(scope: Any, receive: Any, send: Any) -> None:
    # Health checks are the gateway's own requests, not the clients': not counted.
    path = scope.get("path", "")
    if scope["type"] == "http" and upstream_app._admin_op(path) is None and not path.endswith("/healthz"):
        os.write(_FD, b".")
    await upstream_app.app(scope, receive, send)


def main() -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="the test upstream, counting requests in a file")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
