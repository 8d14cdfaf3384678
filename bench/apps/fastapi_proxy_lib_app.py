"""fastapi-proxy-lib's reverse HTTP proxy (an httpx.AsyncClient) in front of BENCH_UPSTREAM."""

from __future__ import annotations

import os

from fastapi_proxy_lib.fastapi.app import reverse_http_app

app = reverse_http_app(base_url=os.environ["BENCH_UPSTREAM"].rstrip("/") + "/")
