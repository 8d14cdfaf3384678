"""asgiproxy (aiohttp client) in front of one server: BENCH_UPSTREAM is its base URL.

Its concurrency semaphore is raised from 20 to 4,096 so it is never the limit here.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import aiohttp
from asgiproxy.config import BaseURLProxyConfigMixin, ProxyConfig
from asgiproxy.context import ProxyContext
from asgiproxy.simple_proxy import make_simple_proxy_app

_upstream = os.environ["BENCH_UPSTREAM"]


class _Config(BaseURLProxyConfigMixin, ProxyConfig):
    upstream_base_url = _upstream
    rewrite_host_header = urlsplit(_upstream).netloc


class _Context(ProxyContext):
    """BENCH_MAX_CONNECTIONS, when set, replaces aiohttp's default of 100 connections."""

    @property
    def session(self) -> aiohttp.ClientSession:
        if not self._session:
            limit = int(os.environ.get("BENCH_MAX_CONNECTIONS") or 100)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=limit),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session


app = make_simple_proxy_app(_Context(_Config(), max_concurrency=4096))
