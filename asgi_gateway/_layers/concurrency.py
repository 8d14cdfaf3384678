"""The adaptive concurrency limit of an upstream: a gradient controller, and the layer that
feeds it latencies.

As Envoy's adaptive concurrency filter (its gradient controller) and Netflix
concurrency-limits' Gradient2: the limit follows the ratio of the upstream's latency without
queueing (the minimum RTT) to its latency now (the sample RTT),

    gradient  = clamp((1 + buffer) * min_rtt / sample_rtt, 0.5, 2.0)
    limit     = gradient * limit + sqrt(gradient * limit), within [min_limit, max_limit]

once per `interval`, so a limit the upstream keeps up with grows and one it queues behind
shrinks, and the requests past it are refused at once instead of waiting in the upstream's
queue. The minimum RTT is measured with the limit held at `min_limit` (so the measurement
sees no queue of the gateway's making): first, and again every `min_rtt_interval` seconds,
jittered so that gateways started together do not all measure at once.

The gateway takes a request's place (`GradientController.acquire`) as soon as the request
is routed, before its body is read: an overflow costs no upload. The place is held until
the exchange is over. The latency sampled is the request's, to its response head, all of its
tries included (`ConcurrencyLayer`, above the retry layer): a request holds its place for all
of them, so that is the time the limit has to cover.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, MutableMapping
from typing import Any, Final

from .._config import AdaptiveConcurrencyConfig, UpstreamConfig
from .._exceptions import ConcurrencyLimitExceeded, GatewayTimeout
from .._types import Handler, Request, Response

__all__ = ["ConcurrencyLayer", "GradientController", "concurrency_layer"]

#: The gradient's bounds, as Envoy's: one window can at most halve or double the limit.
_MIN_GRADIENT: Final = 0.5
_MAX_GRADIENT: Final = 2.0
#: Fewer samples than this in a window say too little: the window runs on until there are.
_MIN_WINDOW_SAMPLES: Final = 5
#: A window ends at this many samples whatever its age: bounded memory and sorting.
_MAX_WINDOW_SAMPLES: Final = 1000


def _percentile(samples: list[float], percent: float) -> float:
    """The nearest-rank `percent` percentile of `samples` (not empty)."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def concurrency_layer(
    upstream: UpstreamConfig,
    inner: Handler,
    registry: MutableMapping[str, GradientController] | None = None,
    *,
    previous: GradientController | None = None,
) -> Handler:
    """`inner` itself for an upstream without `adaptive_concurrency`, else a `ConcurrencyLayer`
    over it, put in `registry` (the limit gauge's) by upstream name.

    Its controller is `previous` (the one of the config a reload replaces) when that was
    built from the same settings: the limit learned so far and the requests holding a place
    in it carry on. Otherwise it has a controller of its own.
    """
    config = upstream.adaptive_concurrency
    if config is None:
        return inner
    if previous is not None and previous.config == config:
        controller = previous
    else:
        controller = GradientController(config, upstream.name)
    if registry is not None:
        registry[upstream.name] = controller
    return ConcurrencyLayer(inner, controller)


class GradientController:
    """The concurrency limit of one upstream and the state it is computed from.

    Not thread-safe, as the rest of a gateway: every call comes from its event loop.
    `clock` and `rng` are there for tests (deterministic time and jitter).

    Attributes:
        config: The settings it was built from.
        limit: Requests allowed in flight now.
        in_flight: Requests holding a place now.
        min_rtt: The last minimum RTT measured, in seconds (None before the first).
        sample_rtt: The sample RTT of the last window, in seconds (None before the first).
        measuring: True while the minimum RTT is being measured (the limit is `min_limit`).
        epoch: Changes when a measurement starts or ends; a latency is counted only in the
            epoch its request started in (`sample`).
    """

    __slots__ = (
        "__weakref__",
        "_buffer",
        "_clock",
        "_estimate",
        "_interval",
        "_jitter",
        "_max",
        "_min",
        "_min_rtt_interval",
        "_min_rtt_samples",
        "_next_measurement",
        "_peak",
        "_percent",
        "_rng",
        "_samples",
        "_window_end",
        "config",
        "epoch",
        "in_flight",
        "limit",
        "measuring",
        "min_rtt",
        "name",
        "sample_rtt",
    )

    def __init__(
        self,
        config: AdaptiveConcurrencyConfig,
        name: str = "",
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._min = config.min_limit
        self._max = config.max_limit
        self._interval = config.interval
        self._percent = config.sample_percentile
        self._buffer = config.buffer
        self._min_rtt_interval = config.min_rtt_interval
        self._min_rtt_samples = config.min_rtt_samples
        self._jitter = config.jitter
        self._clock = clock
        self._rng = rng or random.Random()
        #: The limit as computed, unrounded: `limit` is its integer part, outside measurements.
        self._estimate = float(config.initial_limit)
        self._samples: list[float] = []
        #: The most requests in flight at once in this window.
        self._peak = 0
        self._window_end = 0.0
        self._next_measurement = math.inf
        self.in_flight = 0
        self.min_rtt: float | None = None
        self.sample_rtt: float | None = None
        self.epoch = 0
        # Without a minimum RTT there is nothing to compare with: measure it first, as Envoy does.
        self.measuring = True
        self.limit = self._min

    # -- the request path --------------------------------------------------------------

    def acquire(self) -> bool:
        """Take a place for one request; False when `limit` requests are in flight already."""
        in_flight = self.in_flight
        if in_flight >= self.limit:
            return False
        in_flight += 1
        self.in_flight = in_flight
        if in_flight > self._peak:
            self._peak = in_flight
        return True

    def release(self) -> None:
        """Give back the place `acquire` took."""
        self.in_flight -= 1

    def refusal(self) -> ConcurrencyLimitExceeded:
        """The error an overflowing request gets: 503 `upstream_unavailable`, `Retry-After`."""
        return ConcurrencyLimitExceeded(
            f"upstream {self.name!r} is at its adaptive concurrency limit ({self.limit} in flight)"
        )

    def sample(self, rtt: float, epoch: int) -> None:
        """Count the latency `rtt` (seconds) of a request started in `epoch`.

        A request that started in another epoch ran under another limit (one from before a
        measurement, or the measurement's own) and says nothing about this one.
        """
        if epoch != self.epoch:
            return
        samples = self._samples
        samples.append(rtt)
        if self.measuring:
            if len(samples) >= self._min_rtt_samples:
                self._measured(self._clock())
            return
        count = len(samples)
        if count < _MIN_WINDOW_SAMPLES:
            return
        now = self._clock()
        if now >= self._next_measurement:
            self._measure()
        elif now >= self._window_end or count >= _MAX_WINDOW_SAMPLES:
            self._update(now)

    # -- the controller ----------------------------------------------------------------

    def _measure(self) -> None:
        """Start measuring the minimum RTT: the limit drops to `min_limit` until it is done."""
        self.measuring = True
        self.epoch += 1
        self._samples = []
        self.limit = self._min

    def _measured(self, now: float) -> None:
        self.min_rtt = _percentile(self._samples, self._percent)
        self.measuring = False
        self.epoch += 1
        self.limit = self._bounded(self._estimate)
        jitter = self._rng.uniform(0.0, self._jitter) if self._jitter else 0.0
        self._next_measurement = now + self._min_rtt_interval * (1.0 + jitter)
        self._new_window(now)

    def _update(self, now: float) -> None:
        min_rtt = self.min_rtt
        assert min_rtt is not None  # set by the measurement every window follows
        sample_rtt = self.sample_rtt = _percentile(self._samples, self._percent)
        if self._peak < self._estimate / 2:
            # As Gradient2: with less than half of the limit in use, the limit is not what the
            # latency follows, so it is left as it is: a quiet spell does not raise it (which
            # would leave the upstream open to any burst), a latency spike does not cut it.
            self._new_window(now)
            return
        if sample_rtt > 0:
            gradient = (1.0 + self._buffer) * min_rtt / sample_rtt
            gradient = min(_MAX_GRADIENT, max(_MIN_GRADIENT, gradient))
        else:
            gradient = _MAX_GRADIENT
        limit = gradient * self._estimate
        estimate = limit + math.sqrt(limit)
        self._estimate = min(float(self._max), max(float(self._min), estimate))
        self.limit = self._bounded(self._estimate)
        self._new_window(now)

    def _new_window(self, now: float) -> None:
        self._samples = []
        self._peak = self.in_flight
        self._window_end = now + self._interval

    def _bounded(self, estimate: float) -> int:
        return min(self._max, max(self._min, int(estimate)))

    def status(self) -> dict[str, Any]:
        """A JSON-able view: the limit, requests in flight, and what the limit was computed from."""
        return {
            "limit": self.limit,
            "in_flight": self.in_flight,
            "min_limit": self._min,
            "max_limit": self._max,
            "measuring_min_rtt": self.measuring,
            "min_rtt": round(self.min_rtt, 6) if self.min_rtt is not None else None,
            "sample_rtt": round(self.sample_rtt, 6) if self.sample_rtt is not None else None,
        }


class _Started:
    """When a request's wait for its upstream began: reset once a streamed body has been sent."""

    __slots__ = ("at", "clock")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.at = clock()

    def restart(self) -> None:
        self.at = self.clock()


class ConcurrencyLayer(Handler):
    """Feeds `controller` the latency of each request through `inner`, to its response head.

    The place itself is taken before the body is read, by the gateway (`controller.acquire`),
    and given back when the exchange is over. A read, connect or total timeout counts with the
    time it took (the upstream is at least that slow); other failures say nothing of latency.
    The time runs from when the request reaches this layer, with its body read if it was read
    in advance; for a body streamed up, from the end of the upload, so that a slow client does
    not pass for a slow upstream.
    """

    def __init__(
        self,
        inner: Handler,
        controller: GradientController,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.controller = controller
        self._clock = clock

    async def handle_request(self, request: Request) -> Response:
        controller = self.controller
        epoch = controller.epoch
        clock = self._clock
        body = request.body
        if body.replayable:
            start = clock()
            try:
                response = await self.inner.handle_request(request)
            except GatewayTimeout:
                controller.sample(clock() - start, epoch)
                raise
            controller.sample(clock() - start, epoch)
            return response
        started = _Started(clock)
        body.on_end(started.restart)
        try:
            response = await self.inner.handle_request(request)
        except GatewayTimeout:
            controller.sample(clock() - started.at, epoch)
            raise
        controller.sample(clock() - started.at, epoch)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
