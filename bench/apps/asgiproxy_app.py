"""asgiproxy (aiohttp client) in front of one server: BENCH_UPSTREAM is its base URL.

Its concurrency semaphore is raised from 20 to 1,024 so it is never the limit at 32 connections.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from asgiproxy.config import BaseURLProxyConfigMixin, ProxyConfig
from asgiproxy.context import ProxyContext
from asgiproxy.simple_proxy import make_simple_proxy_app

_upstream = os.environ["BENCH_UPSTREAM"]


class _Config(BaseURLProxyConfigMixin, ProxyConfig):
    upstream_base_url = _upstream
    rewrite_host_header = urlsplit(_upstream).netloc


app = make_simple_proxy_app(ProxyContext(_Config(), max_concurrency=1024))
