"""RetryLayer and RetryBudget in-process, against a scripted inner handler."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import anyio
import pytest

from asgi_gateway._config import RetryConfig, ServerConfig, TimeoutsConfig, UpstreamConfig
from asgi_gateway._exceptions import (
    ConcurrencyLimitExceeded,
    ConnectError,
    ConnectionReset,
    ConnectTimeout,
    InvalidResponse,
    NoServerAvailable,
    PayloadTooLarge,
    ReadTimeout,
    TotalTimeout,
)
from asgi_gateway._layers.retry import RetryBudget, RetryLayer, may_resend
from asgi_gateway._types import Exchange, GatewayEvents, Handler, Headers, Request, RequestBody, Response


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# -- helpers -------------------------------------------------------------------------


class FakeStream:
    def __init__(self, chunks: Sequence[bytes] = (b"ok",), delay: float = 0.0) -> None:
        self.chunks = list(chunks)
        self.delay = delay
        self.closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            if self.delay:
                await anyio.sleep(self.delay)
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


def make_response(status: int, headers: Headers | None = None, stream: FakeStream | None = None) -> Response:
    return Response(status=status, headers=headers or [], stream=stream or FakeStream())


Outcome = BaseException | Response | Callable[[Request], Awaitable[Response]]


class ScriptedInner(Handler):
    """Plays `outcomes` in order, one per attempt; records what each attempt saw."""

    def __init__(self, *outcomes: Outcome, read_body: bool = False) -> None:
        self.outcomes = list(outcomes)
        self.read_body = read_body
        self.calls = 0
        self.bodies: list[bytes] = []
        self.attempt_numbers: list[int] = []
        self.returned: list[Response] = []

    async def handle_request(self, request: Request) -> Response:
        self.calls += 1
        self.attempt_numbers.append(request.exchange.attempts)
        if self.read_body:
            self.bodies.append(b"".join([chunk async for chunk in request.body]))
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, Response):
            response = outcome
        else:
            response = await outcome(request)
        self.returned.append(response)
        return response


class RecordingEvents(GatewayEvents):
    def __init__(self) -> None:
        self.retries: list[tuple[int, str, float]] = []
        self.exhausted: list[str] = []

    def retry(self, exchange: Exchange, attempt: int, reason: str, backoff: float) -> None:
        self.retries.append((attempt, reason, backoff))

    def retry_budget_exhausted(self, exchange: Exchange, reason: str) -> None:
        self.exhausted.append(reason)


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class TopRandom(random.Random):
    """Always draws the upper bound, so the backoff caps become visible."""

    def uniform(self, a: float, b: float) -> float:
        return b


def upstream(
    *,
    attempts: int = 3,
    retry_on: tuple[str | int, ...] = RetryConfig().retry_on,
    backoff_base: float = 0.025,
    backoff_max: float = 0.25,
    total: float = 60.0,
    max_concurrent_requests: int = 1000,
    budget_ratio: float = 0.2,
    budget_min_per_second: float = 10,
) -> UpstreamConfig:
    return UpstreamConfig(
        name="users",
        servers=(ServerConfig("http://127.0.0.1:9001"), ServerConfig("http://127.0.0.1:9002")),
        retry=RetryConfig(
            attempts=attempts,
            retry_on=retry_on,
            backoff_base=backoff_base,
            backoff_max=backoff_max,
            budget_ratio=budget_ratio,
            budget_min_per_second=budget_min_per_second,
        ),
        timeouts=TimeoutsConfig(connect=1.5, read=7.0, total=total),
        max_concurrent_requests=max_concurrent_requests,
    )


def make_request(
    method: str = "GET",
    headers: Headers | None = None,
    body: RequestBody | None = None,
    config: UpstreamConfig | None = None,
) -> Request:
    exchange = Exchange(
        request_id="req-1",
        route="/api",
        upstream=config or upstream(),
        client_ip="127.0.0.1",
        path="/api/x",
        scheme="http",
    )
    return Request(
        method=method,
        target=b"/api/x",
        headers=headers or [],
        body=body or RequestBody([b"payload"], 7),
        exchange=exchange,
    )


async def streamed(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def layer(
    inner: Handler, config: UpstreamConfig | None = None, **kwargs: Any
) -> tuple[RetryLayer, RecordingEvents, RecordingSleep]:
    events = RecordingEvents()
    sleep = RecordingSleep()
    kwargs.setdefault("sleep", sleep)
    return RetryLayer(config or upstream(), inner, events, **kwargs), events, sleep


# -- RetryBudget -------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_budget_allows_ratio_of_requests() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, 0, clock=clock)
    for _ in range(10):
        budget.record_request()
    assert budget.try_acquire_retry()
    assert budget.try_acquire_retry()
    assert not budget.try_acquire_retry()
    assert budget.retries == 2
    budget.record_request()  # 11 requests: 2.2 retries, still 2
    assert not budget.try_acquire_retry()
    for _ in range(4):
        budget.record_request()  # 15 requests: 3 retries
    assert budget.try_acquire_retry()
    assert not budget.try_acquire_retry()


def test_budget_reserve_is_per_second_over_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, 1.5, window=10.0, clock=clock)
    granted = sum(budget.try_acquire_retry() for _ in range(100))
    assert granted == 15  # 1.5 per second x 10 s, with no request at all
    for _ in range(10):
        budget.record_request()
    assert budget.try_acquire_retry()
    assert budget.try_acquire_retry()
    assert not budget.try_acquire_retry()


def test_budget_window_slides() -> None:
    clock = FakeClock(1000.0)
    budget = RetryBudget(0.5, 0, clock=clock)
    for _ in range(4):
        budget.record_request()
    assert budget.try_acquire_retry()
    assert budget.try_acquire_retry()
    assert not budget.try_acquire_retry()
    clock.now = 1005.5
    for _ in range(2):
        budget.record_request()  # 6 requests in the window: 3 retries, 2 taken
    assert budget.try_acquire_retry()
    assert not budget.try_acquire_retry()
    clock.now = 1009.99  # the first second's bucket is still in the window
    assert budget.requests == 6
    clock.now = 1010.0  # ... and now it is out: 2 requests, 1 retry in the window
    assert (budget.requests, budget.retries) == (2, 1)
    assert not budget.try_acquire_retry()
    clock.now = 1016.0
    assert (budget.requests, budget.retries) == (0, 0)
    clock.now = 10**9  # a long idle time clears everything at once
    budget.record_request()
    budget.record_request()
    assert (budget.requests, budget.retries) == (2, 0)
    assert budget.try_acquire_retry()


def test_budget_is_bucketed() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, 10, clock=clock)
    for i in range(100_000):
        clock.now = 1000.0 + i * 0.001
        budget.record_request()
    assert len(budget._requests) == 10
    assert budget.requests == 10_000  # the last 10 one-second buckets: 90.0 s … 99.999 s


def test_budget_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        RetryBudget(-0.1, 1)
    with pytest.raises(ValueError):
        RetryBudget(0.2, 1, window=0)


# -- attempts and conditions ---------------------------------------------------------------


@pytest.mark.anyio
async def test_first_success_sets_timeouts_and_counts() -> None:
    ok = make_response(200)
    inner = ScriptedInner(ok)
    retry, events, sleep = layer(inner)
    request = make_request()
    assert await retry.handle_request(request) is ok
    assert (request.connect_timeout, request.read_timeout) == (1.5, 7.0)
    assert request.exchange.attempts == 1
    assert inner.attempt_numbers == [1]
    assert events.retries == [] and sleep.delays == []
    assert retry.budget.requests == 1 and retry.budget.retries == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectError("refused"), "connect-failure"),
        (ConnectTimeout("slow connect"), "connect-failure"),
        (ConnectionReset("reset"), "reset"),
        (InvalidResponse("garbage"), "reset"),
        (ReadTimeout("slow"), "timeout"),
    ],
)
async def test_get_retries_each_condition(error: Exception, reason: str) -> None:
    ok = make_response(200)
    inner = ScriptedInner(error, error, ok)
    retry, events, sleep = layer(inner)
    request = make_request("GET")
    assert await retry.handle_request(request) is ok
    assert inner.attempt_numbers == [1, 2, 3]
    assert request.exchange.attempts == 3
    assert [(a, r) for a, r, _ in events.retries] == [(2, reason), (3, reason)]
    assert sleep.delays == [b for _, _, b in events.retries]
    assert retry.budget.retries == 2


@pytest.mark.anyio
async def test_condition_not_listed_is_not_retried() -> None:
    error = ReadTimeout("slow")
    inner = ScriptedInner(error, make_response(200))
    retry, events, _ = layer(inner, upstream(retry_on=("connect-failure", 503)))
    with pytest.raises(ReadTimeout) as caught:
        await retry.handle_request(make_request())
    assert caught.value is error
    assert inner.calls == 1 and events.retries == []


@pytest.mark.anyio
async def test_status_retry_closes_the_response_first() -> None:
    first = make_response(503)
    ok = make_response(200)
    seen_closed: list[bool] = []

    async def second(request: Request) -> Response:
        seen_closed.append(first.stream.closed)  # type: ignore[attr-defined]
        return ok

    inner = ScriptedInner(first, second)
    retry, events, _ = layer(inner)
    assert await retry.handle_request(make_request()) is ok
    assert seen_closed == [True]
    assert [r for _, r, _ in events.retries] == ["status:503"]
    assert not ok.stream.closed  # type: ignore[attr-defined]


class BrokenCloseStream(FakeStream):
    def __init__(self, hang: bool) -> None:
        super().__init__()
        self.hang = hang

    async def aclose(self) -> None:
        if self.hang:
            await anyio.sleep_forever()
        raise ConnectionResetError("the connection broke while closing")


@pytest.mark.anyio
@pytest.mark.parametrize("hang", [False, True])
async def test_a_failing_close_does_not_stop_the_retry(hang: bool) -> None:
    ok = make_response(200)
    inner = ScriptedInner(make_response(503, stream=BrokenCloseStream(hang)), ok)
    retry, _, _ = layer(inner, upstream(max_concurrent_requests=1))
    start = time.monotonic()
    assert await retry.handle_request(make_request()) is ok
    assert time.monotonic() - start < (1.5 if hang else 0.5)  # a stuck close is given up after 1 s
    await ok.aclose()
    assert retry.in_flight == 0


@pytest.mark.anyio
async def test_unlisted_status_is_returned() -> None:
    error_page = make_response(500)
    inner = ScriptedInner(error_page, make_response(200))
    retry, _, _ = layer(inner)
    assert await retry.handle_request(make_request()) is error_page
    assert inner.calls == 1 and not error_page.stream.closed  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_last_attempt_returns_the_response_as_is() -> None:
    responses = [make_response(502), make_response(503), make_response(504)]
    inner = ScriptedInner(*responses)
    retry, events, _ = layer(inner)
    assert await retry.handle_request(make_request()) is responses[2]
    assert [r.stream.closed for r in responses] == [True, True, False]  # type: ignore[attr-defined]
    assert [r for _, r, _ in events.retries] == ["status:502", "status:503"]


@pytest.mark.anyio
async def test_last_error_is_raised() -> None:
    errors = [ConnectError("a"), ConnectionReset("b"), ConnectError("c")]
    inner = ScriptedInner(*errors)
    retry, _, _ = layer(inner)
    with pytest.raises(ConnectError) as caught:
        await retry.handle_request(make_request())
    assert caught.value is errors[2]
    assert inner.calls == 3


@pytest.mark.anyio
async def test_one_attempt_means_no_retry() -> None:
    inner = ScriptedInner(ConnectError("refused"), make_response(200))
    retry, events, _ = layer(inner, upstream(attempts=1))
    with pytest.raises(ConnectError):
        await retry.handle_request(make_request())
    assert inner.calls == 1 and events.retries == []


@pytest.mark.anyio
@pytest.mark.parametrize("error", [NoServerAvailable("none"), PayloadTooLarge("big")])
async def test_errors_without_a_condition_are_not_retried(error: Exception) -> None:
    inner = ScriptedInner(error, make_response(200))
    retry, _, _ = layer(inner)
    with pytest.raises(type(error)):
        await retry.handle_request(make_request())
    assert inner.calls == 1


# -- idempotency -------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"])
async def test_idempotent_methods_retry_after_reaching_the_upstream(method: str) -> None:
    ok = make_response(200)
    inner = ScriptedInner(ConnectionReset("reset"), make_response(503), ok)
    retry, _, _ = layer(inner)
    assert await retry.handle_request(make_request(method)) is ok


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["POST", "PATCH"])
@pytest.mark.parametrize(
    "outcome", [ConnectionReset("reset"), ReadTimeout("slow"), InvalidResponse("bad"), 503, 502]
)
async def test_non_idempotent_is_not_retried_once_it_reached_the_upstream(
    method: str, outcome: Exception | int
) -> None:
    first: Outcome = make_response(outcome) if isinstance(outcome, int) else outcome
    inner = ScriptedInner(first, make_response(200))
    retry, events, _ = layer(inner)
    if isinstance(first, BaseException):
        with pytest.raises(type(first)):
            await retry.handle_request(make_request(method))
    else:
        assert isinstance(first, Response)
        assert await retry.handle_request(make_request(method)) is first
        assert not first.stream.closed  # type: ignore[attr-defined]
    assert inner.calls == 1 and events.retries == [] and retry.budget.retries == 0


@pytest.mark.anyio
@pytest.mark.parametrize("error", [ConnectError("refused"), ConnectTimeout("slow connect")])
async def test_non_idempotent_is_retried_when_it_never_reached_the_upstream(error: Exception) -> None:
    ok = make_response(200)
    inner = ScriptedInner(error, ok, read_body=False)
    retry, _, _ = layer(inner)
    assert await retry.handle_request(make_request("POST")) is ok
    assert inner.calls == 2


@pytest.mark.anyio
@pytest.mark.parametrize("outcome", [ConnectionReset("reset"), ReadTimeout("slow"), 503])
async def test_idempotency_key_makes_post_retryable(outcome: Exception | int) -> None:
    ok = make_response(200)
    first: Outcome = make_response(outcome) if isinstance(outcome, int) else outcome
    inner = ScriptedInner(first, ok)
    retry, _, _ = layer(inner)
    request = make_request("POST", headers=[(b"content-type", b"text/plain"), (b"idempotency-key", b"k-1")])
    assert await retry.handle_request(request) is ok
    assert inner.calls == 2


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", [], True),
        ("DELETE", [], True),
        ("POST", [], False),
        ("PATCH", [(b"x-idempotency-key", b"k")], False),
        ("POST", [(b"idempotency-key", b"k")], True),
    ],
)
def test_may_resend(method: str, headers: Headers, expected: bool) -> None:
    assert may_resend(make_request(method, headers=headers)) is expected


# -- bodies -------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_buffered_body_is_replayed_whole() -> None:
    ok = make_response(200)
    inner = ScriptedInner(ConnectionReset("reset"), make_response(503), ok, read_body=True)
    retry, _, _ = layer(inner)
    body = RequestBody([b"abc", b"def"], 6)
    assert await retry.handle_request(make_request("PUT", body=body)) is ok
    assert inner.bodies == [b"abcdef"] * 3


@pytest.mark.anyio
async def test_streamed_body_is_not_retried_once_started() -> None:
    inner = ScriptedInner(ConnectionReset("reset"), make_response(200), read_body=True)
    retry, events, _ = layer(inner)
    body = RequestBody([b"head-"], None, rest=streamed(b"tail"))
    with pytest.raises(ConnectionReset):
        await retry.handle_request(make_request("PUT", body=body))
    assert inner.bodies == [b"head-tail"] and events.retries == []


@pytest.mark.anyio
async def test_streamed_body_started_with_a_status_is_returned() -> None:
    unavailable = make_response(503)
    inner = ScriptedInner(unavailable, make_response(200), read_body=True)
    retry, _, _ = layer(inner)
    body = RequestBody([], None, rest=streamed(b"x" * 10))
    assert await retry.handle_request(make_request("PUT", body=body)) is unavailable


@pytest.mark.anyio
async def test_streamed_body_not_started_is_retried() -> None:
    ok = make_response(200)
    bodies: list[bytes] = []

    async def reads_body(request: Request) -> Response:
        bodies.append(b"".join([chunk async for chunk in request.body]))
        return ok

    inner = ScriptedInner(ConnectError("refused"), reads_body)
    retry, _, _ = layer(inner)
    body = RequestBody([b"head-"], None, rest=streamed(b"tail"))
    assert await retry.handle_request(make_request("POST", body=body)) is ok
    assert bodies == [b"head-tail"]


@pytest.mark.anyio
async def test_nothing_is_retried_once_committed() -> None:
    async def commits_then_fails(request: Request) -> Response:
        request.exchange.committed = True
        raise ConnectionReset("reset")

    inner = ScriptedInner(commits_then_fails, make_response(200))
    retry, events, _ = layer(inner)
    with pytest.raises(ConnectionReset):
        await retry.handle_request(make_request("GET"))
    assert inner.calls == 1 and events.retries == []


# -- backoff and Retry-After -----------------------------------------------------------------


@pytest.mark.anyio
async def test_backoff_caps_double_up_to_the_max() -> None:
    config = upstream(attempts=6, backoff_base=0.1, backoff_max=0.25)
    inner = ScriptedInner(*[ConnectError("x")] * 5, make_response(200))
    retry, events, sleep = layer(inner, config, rng=TopRandom())
    await retry.handle_request(make_request())
    assert sleep.delays == pytest.approx([0.1, 0.2, 0.25, 0.25, 0.25])
    assert [b for _, _, b in events.retries] == sleep.delays


@pytest.mark.anyio
async def test_backoff_is_full_jitter() -> None:
    config = upstream(attempts=4, backoff_base=0.1, backoff_max=1.0)
    inner = ScriptedInner(*[ConnectError("x")] * 3, make_response(200))
    retry, _, sleep = layer(inner, config, rng=random.Random(7))
    await retry.handle_request(make_request())
    twin = random.Random(7)
    assert sleep.delays == [twin.uniform(0, 0.1), twin.uniform(0, 0.2), twin.uniform(0, 0.4)]
    assert all(0 <= d <= cap for d, cap in zip(sleep.delays, [0.1, 0.2, 0.4], strict=True))


@pytest.mark.anyio
async def test_backoff_really_sleeps_by_default() -> None:
    config = upstream(attempts=2, backoff_base=0.1, backoff_max=0.1)
    inner = ScriptedInner(ConnectError("x"), make_response(200))
    retry = RetryLayer(config, inner, rng=TopRandom())
    start = time.monotonic()
    await retry.handle_request(make_request())
    assert 0.09 <= time.monotonic() - start < 1.0


def retry_after(value: bytes, status: int = 503) -> Response:
    return make_response(status, [(b"content-type", b"text/plain"), (b"retry-after", value)])


@pytest.mark.anyio
async def test_retry_after_seconds_is_honoured() -> None:
    ok = make_response(200)
    inner = ScriptedInner(retry_after(b"2"), ok)
    retry, events, sleep = layer(inner, upstream(total=10.0), rng=TopRandom())
    assert await retry.handle_request(make_request()) is ok
    assert sleep.delays == [2.0] and events.retries == [(2, "status:503", 2.0)]


@pytest.mark.anyio
async def test_retry_after_date_is_honoured() -> None:
    when = email.utils.formatdate(time.time() + 5, usegmt=True).encode()
    inner = ScriptedInner(retry_after(when), make_response(200))
    retry, _, sleep = layer(inner, upstream(total=10.0))
    await retry.handle_request(make_request())
    assert len(sleep.delays) == 1 and 3.5 <= sleep.delays[0] <= 5.0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "value", [b"0", b"Thu, 01 Jan 1970 00:00:00 -0000", b"Sun, 06 Nov 1994 08:49:37 GMT"]
)
async def test_retry_after_now_or_past_retries_at_once(value: bytes) -> None:
    ok = make_response(200)
    inner = ScriptedInner(retry_after(value), ok)
    retry, events, sleep = layer(inner)
    assert await retry.handle_request(make_request()) is ok
    assert sleep.delays == [] and events.retries == [(2, "status:503", 0.0)]


@pytest.mark.anyio
async def test_retry_after_past_the_deadline_returns_the_503() -> None:
    unavailable = retry_after(b"5")
    inner = ScriptedInner(unavailable, make_response(200))
    retry, events, sleep = layer(inner, upstream(total=2.0))
    assert await retry.handle_request(make_request()) is unavailable
    assert inner.calls == 1 and sleep.delays == [] and events.retries == []
    assert not unavailable.stream.closed  # type: ignore[attr-defined]
    assert retry.budget.retries == 0


@pytest.mark.anyio
@pytest.mark.parametrize(("value", "status"), [(b"soon", 503), (b"-1", 503), (b"3", 502)])
async def test_unusable_retry_after_falls_back_to_jitter(value: bytes, status: int) -> None:
    inner = ScriptedInner(retry_after(value, status), make_response(200))
    retry, _, sleep = layer(inner, upstream(backoff_base=0.01, backoff_max=0.01), rng=TopRandom())
    await retry.handle_request(make_request())
    assert sleep.delays == [0.01]


# -- budget in the layer ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_exhausted_budget_returns_the_failure() -> None:
    budget = RetryBudget(0.0, 0.0)
    unavailable = make_response(503)
    error = ConnectError("refused")
    inner = ScriptedInner(unavailable, error, make_response(200))
    retry, events, sleep = layer(inner, budget=budget)
    assert await retry.handle_request(make_request()) is unavailable
    assert not unavailable.stream.closed  # type: ignore[attr-defined]
    with pytest.raises(ConnectError) as caught:
        await retry.handle_request(make_request())
    assert caught.value is error
    assert events.exhausted == ["status:503", "connect-failure"]
    assert events.retries == [] and sleep.delays == []
    assert budget.requests == 2


@pytest.mark.anyio
async def test_budget_bounds_retries_across_requests() -> None:
    # 0.2 x 50 requests + 1 per second x 10 s = 20 retries at most, for 50 x 2 wanted.
    config = upstream(budget_ratio=0.2, budget_min_per_second=1)
    inner = ScriptedInner(*[ConnectError("x")] * 1000)
    retry, events, _ = layer(inner, config)
    for _ in range(50):
        with pytest.raises(ConnectError):
            await retry.handle_request(make_request())
    assert inner.calls == 50 + 20
    assert len(events.retries) == 20
    # The first five requests spent the reserve on two retries each; every later one was refused once.
    assert len(events.exhausted) == 45


# -- deadline -----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_total_deadline_raises_total_timeout_and_cancels_the_attempt() -> None:
    cancelled = anyio.Event()

    async def hangs(request: Request) -> Response:
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    inner = ScriptedInner(hangs)
    retry, _, _ = layer(inner, upstream(total=0.3))
    start = time.monotonic()
    with pytest.raises(TotalTimeout) as caught:
        await retry.handle_request(make_request())
    elapsed = time.monotonic() - start
    assert 0.29 <= elapsed < 0.45
    assert cancelled.is_set()
    assert caught.value.status == 504
    assert retry.in_flight == 0


@pytest.mark.anyio
async def test_total_deadline_covers_every_attempt_and_backoff() -> None:
    async def fails_late(request: Request) -> Response:
        await anyio.sleep(0.15)
        raise ConnectionReset("reset")

    inner = ScriptedInner(fails_late, fails_late, fails_late)
    retry = RetryLayer(upstream(total=0.4, backoff_base=0.05, backoff_max=0.05), inner)
    start = time.monotonic()
    request = make_request()
    with pytest.raises(TotalTimeout):
        await retry.handle_request(request)
    assert 0.39 <= time.monotonic() - start < 0.55
    assert request.exchange.attempts == 3


async def slow_upload(pieces: int, delay: float) -> AsyncIterator[bytes]:
    for _ in range(pieces):
        await anyio.sleep(delay)
        yield b"x" * 100


@pytest.mark.anyio
async def test_total_deadline_starts_once_a_streamed_body_is_in() -> None:
    async def reads_body_then_answers(request: Request) -> Response:
        async for _ in request.body:
            pass
        await anyio.sleep(0.1)
        return make_response(200)

    retry, _, _ = layer(ScriptedInner(reads_body_then_answers), upstream(total=0.3))
    body = RequestBody([], None, rest=slow_upload(5, 0.1))  # 0.5 s of upload, past the 0.3 s total
    response = await retry.handle_request(make_request("POST", body=body))
    assert response.status == 200


@pytest.mark.anyio
async def test_total_deadline_after_a_streamed_body_still_fires() -> None:
    cancelled = anyio.Event()

    async def reads_body_then_hangs(request: Request) -> Response:
        async for _ in request.body:
            pass
        try:
            await anyio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    retry, _, _ = layer(ScriptedInner(reads_body_then_hangs), upstream(total=0.2))
    body = RequestBody([], None, rest=slow_upload(3, 0.1))
    start = time.monotonic()
    with pytest.raises(TotalTimeout):
        await retry.handle_request(make_request("POST", body=body))
    # 0.3 s of upload, then the 0.2 s deadline.
    assert 0.49 <= time.monotonic() - start < 0.8
    assert cancelled.is_set()
    assert retry.in_flight == 0


@pytest.mark.anyio
async def test_deadline_armed_after_an_early_answer_does_nothing() -> None:
    # The answer comes before the body has ended; the body given up later must not arm a
    # deadline that would cancel whatever the task does next.
    body = RequestBody([], None, rest=slow_upload(3, 0.01))

    async def answers_early(request: Request) -> Response:
        return make_response(401)

    retry, _, _ = layer(ScriptedInner(answers_early), upstream(total=0.05))
    response = await retry.handle_request(make_request("POST", body=body))
    assert response.status == 401
    iterator = body.__aiter__()
    await iterator.__anext__()
    await iterator.aclose()  # the body is given up now
    await anyio.sleep(0.15)  # three times the total: no cancellation reaches us
    assert response.status == 401


@pytest.mark.anyio
async def test_backoff_past_the_deadline_gives_the_real_error() -> None:
    error = ConnectError("refused")
    inner = ScriptedInner(error, make_response(200))
    retry, _, sleep = layer(inner, upstream(total=0.5, backoff_base=1.0, backoff_max=1.0), rng=TopRandom())
    with pytest.raises(ConnectError) as caught:
        await retry.handle_request(make_request())
    assert caught.value is error and sleep.delays == []


@pytest.mark.anyio
async def test_deadline_ends_with_the_response_head() -> None:
    ok = make_response(200, stream=FakeStream([b"a", b"b", b"c"], delay=0.1))
    inner = ScriptedInner(ok)
    retry, _, _ = layer(inner, upstream(total=0.1))
    response = await retry.handle_request(make_request())
    body = b"".join([chunk async for chunk in response.stream])  # 0.3 s, three times the total
    await response.aclose()
    assert body == b"abc"


@pytest.mark.anyio
async def test_outer_cancellation_is_not_a_timeout() -> None:
    async def hangs(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    retry, _, _ = layer(ScriptedInner(hangs), upstream(total=10.0))
    with anyio.move_on_after(0.05) as scope:
        await retry.handle_request(make_request())
    assert scope.cancelled_caught
    assert retry.in_flight == 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_timeout_leaves_the_task_uncancelled(anyio_backend: str) -> None:
    # The deadline cancels the task and takes that cancellation back: later awaits still work.
    task = asyncio.current_task()
    assert task is not None

    async def hangs(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    retry, _, _ = layer(ScriptedInner(hangs), upstream(total=0.05))
    with pytest.raises(TotalTimeout):
        await retry.handle_request(make_request())
    assert task.cancelling() == 0
    await asyncio.sleep(0)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_outer_cancellation_with_the_deadline_is_not_a_timeout(anyio_backend: str) -> None:
    # The deadline and an outer cancellation land in the same loop iteration: the outer one
    # wins, as with asyncio.timeout().
    loop = asyncio.get_running_loop()

    async def hangs(request: Request) -> Response:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    retry, _, _ = layer(ScriptedInner(hangs), upstream(total=0.05))
    outer = asyncio.ensure_future(retry.handle_request(make_request()))
    await asyncio.sleep(0)
    loop.call_later(0.1, outer.cancel)
    # Block the loop past both times, so both timers run back to back: the deadline first.
    loop.call_later(0.01, time.sleep, 0.15)
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert retry.in_flight == 0


# -- concurrency limit ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_overflow_is_refused_at_once_and_slots_come_back() -> None:
    held = [make_response(200), make_response(200)]
    inner = ScriptedInner(*held, make_response(200))
    retry, _, _ = layer(inner, upstream(max_concurrent_requests=2))
    first = await retry.handle_request(make_request())
    await retry.handle_request(make_request())
    assert retry.in_flight == 2
    with pytest.raises(ConcurrencyLimitExceeded) as caught:
        await retry.handle_request(make_request())
    assert caught.value.status == 503 and inner.calls == 2
    assert retry.budget.requests == 2
    await first.aclose()
    await first.aclose()  # a second close gives nothing back twice
    assert retry.in_flight == 1
    third = await retry.handle_request(make_request())
    assert retry.in_flight == 2
    await third.aclose()
    await held[1].aclose()
    assert retry.in_flight == 0


@pytest.mark.anyio
async def test_slot_is_released_on_error() -> None:
    inner = ScriptedInner(ConnectError("x"), ConnectError("y"), ConnectError("z"))
    retry, _, _ = layer(inner, upstream(max_concurrent_requests=1))
    with pytest.raises(ConnectError):
        await retry.handle_request(make_request())
    assert retry.in_flight == 0


@pytest.mark.anyio
async def test_slot_is_held_once_across_retries() -> None:
    first = make_response(503)
    ok = make_response(200)
    inner = ScriptedInner(first, ok)
    retry, _, _ = layer(inner, upstream(max_concurrent_requests=1))
    response = await retry.handle_request(make_request())
    assert response is ok and first.stream.closed  # type: ignore[attr-defined]
    assert retry.in_flight == 1
    await response.aclose()
    assert retry.in_flight == 0


@pytest.mark.anyio
async def test_concurrent_overflow_while_attempts_hang() -> None:
    release = anyio.Event()
    entered = 0

    async def waits(request: Request) -> Response:
        nonlocal entered
        entered += 1
        await release.wait()
        return make_response(200)

    inner = ScriptedInner(waits, waits, waits)
    retry, _, _ = layer(inner, upstream(max_concurrent_requests=2))
    responses: list[Response] = []

    async def call() -> None:
        responses.append(await retry.handle_request(make_request()))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        tg.start_soon(call)
        with anyio.fail_after(5):
            while entered < 2:
                await anyio.sleep(0.001)
        with pytest.raises(ConcurrencyLimitExceeded):
            await retry.handle_request(make_request())
        release.set()
    assert len(responses) == 2 and retry.in_flight == 2
    for response in responses:
        await response.aclose()
    assert retry.in_flight == 0


@pytest.mark.anyio
async def test_aclose_closes_the_inner_handler() -> None:
    closed: list[bool] = []

    class Inner(ScriptedInner):
        async def aclose(self) -> None:
            closed.append(True)

    retry, _, _ = layer(Inner())
    await retry.aclose()
    assert closed == [True]


def test_config_defaults_build_a_layer() -> None:
    config = replace(upstream(), retry=RetryConfig())
    retry = RetryLayer(config, ScriptedInner())
    assert retry.budget.try_acquire_retry()  # the reserve: 10 per second
