"""Unit tests of the balancers: exact round robin sequences, statistics of the random kinds
(chi-square with fixed seeds), least connections, and consistent hashing's remap fraction."""

from __future__ import annotations

import bisect
import collections
import math
import os
import random
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_gateway._config import ServerConfig, UpstreamConfig
from asgi_gateway._exceptions import ConnectError, TotalTimeout
from asgi_gateway._layers import balancer as balancer_module
from asgi_gateway._layers.balancer import (
    LEAST_CONNECTIONS_EXACT_LIMIT,
    PEAK_EWMA_FAILURE_FLOOR,
    Balancer,
    ConsistentHashBalancer,
    LeastConnectionsBalancer,
    PeakEwmaBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    WeightedRandomBalancer,
    alias_tables,
    hash_key,
    key_function,
    make_balancer,
    smooth_cycle,
)
from asgi_gateway._layers.failover import FailoverLayer
from asgi_gateway._types import Exchange, Handler, Request, RequestBody, Response, Server

KINDS = ("round_robin", "random", "weighted_random", "least_connections", "peak_ewma", "consistent_hash")


def make_servers(weights: Sequence[int], base_port: int = 9000, backup: bool = False) -> list[Server]:
    return [
        Server(
            url=f"http://127.0.0.1:{base_port + i}",
            scheme="http",
            host="127.0.0.1",
            port=base_port + i,
            weight=weight,
            backup=backup,
            index=i,
            upstream="u",
            host_header=f"127.0.0.1:{base_port + i}".encode(),
        )
        for i, weight in enumerate(weights)
    ]


def upstream_for(
    servers: Sequence[Server], balancer: str = "round_robin", hash_on: str | None = None
) -> UpstreamConfig:
    return UpstreamConfig(
        name="u",
        servers=tuple(ServerConfig(url=s.url, weight=s.weight) for s in servers),
        balancer=balancer,  # type: ignore[arg-type]
        hash_on=hash_on,
    )


def balancer_for(
    servers: Sequence[Server],
    balancer: str = "round_robin",
    hash_on: str | None = None,
    seed: int = 1,
) -> Balancer:
    made = make_balancer(upstream_for(servers, balancer, hash_on), rng=random.Random(seed))
    made.set_servers(servers)
    return made


UPSTREAM = UpstreamConfig(name="u", servers=(ServerConfig(url="http://127.0.0.1:1"),))


def make_request(
    headers: Sequence[tuple[bytes, bytes]] = (), client_ip: str = "10.0.0.1", path: str = "/"
) -> Request:
    exchange = Exchange(
        request_id="r", route="/", upstream=UPSTREAM, client_ip=client_ip, path=path, scheme="http"
    )
    return Request(
        method="GET", target=path.encode(), headers=list(headers), body=RequestBody([], 0), exchange=exchange
    )


REQUEST = make_request()


def names(picks: Sequence[Server | None]) -> str:
    return "".join("abcdefghijklmnopqrstuvwxyz"[s.index] if s is not None else "-" for s in picks)


def nginx_reference(weights: Sequence[int], count: int) -> list[int]:
    """NGINX's ngx_http_upstream_get_peer, literally: O(n) per pick."""
    current = [0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(count):
        best = -1
        for i, weight in enumerate(weights):
            current[i] += weight
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


def chi_square(observed: Sequence[int], expected: Sequence[float]) -> float:
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def counts(picks: Sequence[Server | None], servers: Sequence[Server]) -> list[int]:
    counter = collections.Counter(id(s) for s in picks)
    return [counter[id(s)] for s in servers]


# -- round robin ---------------------------------------------------------------------------


def test_smooth_round_robin_1_2_3_is_interleaved_not_bursts() -> None:
    servers = make_servers([1, 2, 3])
    balancer = balancer_for(servers)
    picks = [balancer.pick(REQUEST) for _ in range(18)]
    assert names(picks) == "cbacbc" * 3
    for start in range(len(picks) - 6 + 1):
        window = counts(picks[start : start + 6], servers)
        assert window == [1, 2, 3], (start, window)


def test_smooth_round_robin_equal_weights_rotates_in_order() -> None:
    balancer = balancer_for(make_servers([1, 1, 1]))
    assert names([balancer.pick(REQUEST) for _ in range(7)]) == "abcabca"
    balancer = balancer_for(make_servers([4, 4, 4, 4]))
    assert names([balancer.pick(REQUEST) for _ in range(8)]) == "abcdabcd"


def test_smooth_round_robin_matches_nginx_documented_example() -> None:
    # The example from NGINX's commit introducing smooth weighted round robin: { a, a, b, a, c, a, a }.
    balancer = balancer_for(make_servers([5, 1, 1]))
    assert names([balancer.pick(REQUEST) for _ in range(14)]) == "aabacaa" * 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=9))
def test_smooth_cycle_is_nginx_sequence(weights: list[int]) -> None:
    cycle = smooth_cycle(weights)
    assert cycle is not None
    divisor = math.gcd(*weights)
    assert len(cycle) == sum(weights) // divisor
    assert cycle == nginx_reference(weights, len(cycle))
    # The cycle repeats: NGINX's own sequence over two cycles is the cycle twice.
    assert nginx_reference(weights, 2 * len(cycle)) == cycle * 2


def test_smooth_round_robin_changing_set_keeps_position() -> None:
    a, b, c = make_servers([1, 1, 1])
    balancer = RoundRobinBalancer()
    balancer.set_servers([a, b, c])
    assert names([balancer.pick(REQUEST) for _ in range(2)]) == "ab"
    # b leaves: the cycle becomes a c; the position (2) carries over modulo 2.
    balancer.set_servers([a, c])
    assert names([balancer.pick(REQUEST) for _ in range(5)]) == "acaca"
    # Setting the same set again changes nothing.
    balancer.set_servers([a, c])
    assert names([balancer.pick(REQUEST)]) == "c"
    # b returns: position 0 of a b c.
    balancer.set_servers([a, b, c])
    assert names([balancer.pick(REQUEST) for _ in range(6)]) == "abcabc"
    # Weights 1:2:3 from the middle of a cycle: every 6 consecutive picks still hold 1, 2, 3.
    weighted = make_servers([1, 2, 3], base_port=9100)
    balancer.set_servers(weighted)
    picks = [balancer.pick(REQUEST) for _ in range(12)]
    assert names(picks) == "cbacbc" * 2
    balancer.set_servers([])
    assert balancer.pick(REQUEST) is None
    balancer.set_servers(weighted[:1])
    assert names([balancer.pick(REQUEST) for _ in range(3)]) == "aaa"


def test_round_robin_long_cycle_falls_back_to_earliest_deadline_first() -> None:
    # A cycle of 9,003 picks is too long to precompute: the heap takes over, still exact per cycle.
    weights = [9000, 1, 2]
    assert smooth_cycle(weights) is None
    servers = make_servers(weights)
    balancer = balancer_for(servers)
    picks = [balancer.pick(REQUEST) for _ in range(sum(weights))]
    assert counts(picks, servers) == weights
    # Spread out: c's two picks are half a cycle apart, not adjacent.
    positions = [i for i, s in enumerate(picks) if s is servers[2]]
    assert positions[1] - positions[0] > 4000


def test_round_robin_many_distinct_weights_heap_exact_per_cycle() -> None:
    weights = list(range(1, 201))  # sum 20,100: heap mode
    assert smooth_cycle(weights) is None
    servers = make_servers(weights)
    balancer = balancer_for(servers)
    total = sum(weights)
    picks = [balancer.pick(REQUEST) for _ in range(2 * total)]
    assert counts(picks[:total], servers) == weights
    assert counts(picks[total:], servers) == weights
    # Smooth: within any window, no server strays more than two picks from its share (bursts would
    # put a weight-200 server's 200 picks in a row).
    window = 1000
    for start in range(0, 2 * total - window, 997):
        got = counts(picks[start : start + window], servers)
        for weight, n in zip(weights, got, strict=True):
            assert abs(n - weight * window / total) <= 2


def test_round_robin_heap_mode_set_change_keeps_deadlines() -> None:
    weights = [9000, 1, 2]
    servers = make_servers(weights)
    balancer = balancer_for(servers)
    for _ in range(100):
        balancer.pick(REQUEST)
    balancer.set_servers(servers[:2])
    picks = [balancer.pick(REQUEST) for _ in range(9001)]
    assert counts(picks, servers) == [9000, 1, 0]
    balancer.set_servers(servers)
    picks = [balancer.pick(REQUEST) for _ in range(9003)]
    assert counts(picks, servers) == weights


def test_round_robin_exclude_takes_next_in_cycle() -> None:
    a, b, c = servers = make_servers([1, 1, 1])
    balancer = balancer_for(servers)
    assert balancer.pick(REQUEST, exclude=[a]) is b
    assert balancer.pick(REQUEST, exclude=[a, b]) is c
    assert balancer.pick(REQUEST, exclude=[a, b, c]) in servers
    heavy = make_servers([9000, 1, 2])
    balancer = balancer_for(heavy)
    retries = [balancer.pick(REQUEST, exclude=[heavy[0]]) for _ in range(100)]
    assert all(s in heavy[1:] for s in retries)
    assert min(counts(retries, heavy[1:])) >= 30
    assert all(balancer.pick(REQUEST, exclude=heavy[:2]) is heavy[2] for _ in range(100))


# -- random kinds --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_is_uniform_whatever_the_weights(seed: int) -> None:
    servers = make_servers([1, 5, 1, 2])
    balancer = balancer_for(servers, "random", seed=seed)
    assert isinstance(balancer, RandomBalancer)
    n = 40_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    assert chi_square(got, [n / 4] * 4) < chi_square_critical(3)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_random_is_proportional(seed: int) -> None:
    weights = [1, 2, 3, 4]
    servers = make_servers(weights)
    balancer = balancer_for(servers, "weighted_random", seed=seed)
    assert isinstance(balancer, WeightedRandomBalancer)
    n = 40_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    assert chi_square(got, [n * w / 10 for w in weights]) < chi_square_critical(3)
    # The test has power: the same counts are far from uniform.
    assert chi_square(got, [n / 4] * 4) > 10 * chi_square_critical(3)


def test_weighted_random_with_100_servers() -> None:
    weights = [1 + i % 10 for i in range(100)]
    servers = make_servers(weights)
    balancer = balancer_for(servers, "weighted_random", seed=7)
    n = 200_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    total = sum(weights)
    assert chi_square(got, [n * w / total for w in weights]) < chi_square_critical(99)


@pytest.mark.parametrize("kind", ["random", "weighted_random", "least_connections"])
def test_random_kinds_are_reproducible_with_an_injected_rng(kind: str) -> None:
    servers = make_servers([1, 2, 3] * 20)

    def run(seed: int) -> list[int]:
        balancer = balancer_for(servers, kind, seed=seed)
        picked = []
        for _ in range(200):
            server = balancer.pick(REQUEST)
            assert server is not None
            picked.append(server.index)
        return picked

    assert run(5) == run(5)
    assert run(5) != run(6)


@pytest.mark.parametrize("kind", ["random", "weighted_random"])
def test_random_kinds_honour_exclude(kind: str) -> None:
    servers = make_servers([1, 1, 8])
    balancer = balancer_for(servers, kind)
    picks = [balancer.pick(REQUEST, exclude=servers[1:]) for _ in range(500)]
    assert all(s is servers[0] for s in picks)
    picks = [balancer.pick(REQUEST, exclude=servers[2:]) for _ in range(2000)]
    got = counts(picks, servers)
    assert got[2] == 0 and min(got[:2]) > 850
    # Everything excluded: any server of the set (retries may reuse one).
    assert all(balancer.pick(REQUEST, exclude=servers) in servers for _ in range(50))


def alias_share(probability: Sequence[float], alias: Sequence[int]) -> list[float]:
    """The probability of each index that the alias tables give (column c is drawn with 1/n)."""
    n = len(probability)
    share = [0.0] * n
    for column, (p, other) in enumerate(zip(probability, alias, strict=True)):
        share[column] += p / n
        share[other] += (1 - p) / n
    return share


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10**9), min_size=1, max_size=40))
def test_alias_tables_give_each_index_its_weight(weights: list[int]) -> None:
    probability, alias = alias_tables(weights)
    assert len(probability) == len(alias) == len(weights)
    assert all(0 < p <= 1 for p in probability)
    assert all(0 <= a < len(weights) for a in alias)
    total = sum(weights)
    for share, weight in zip(alias_share(probability, alias), weights, strict=True):
        assert share == pytest.approx(weight / total, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_weighted_random_alias_tables_are_proportional(seed: int) -> None:
    # Weights adding up to more than a table can hold (after dividing by their gcd): alias tables.
    weights = [10_001, 20_000, 30_000, 40_000]
    servers = make_servers(weights)
    balancer = balancer_for(servers, "weighted_random", seed=seed)
    n = 40_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    total = sum(weights)
    assert chi_square(got, [n * w / total for w in weights]) < chi_square_critical(3)
    assert chi_square(got, [n / 4] * 4) > 10 * chi_square_critical(3)
    # exclude still holds with alias tables.
    picks = [balancer.pick(REQUEST, exclude=servers[1:]) for _ in range(200)]
    assert all(s is servers[0] for s in picks)
    picks = [balancer.pick(REQUEST, exclude=servers[3:]) for _ in range(6000)]
    got = counts(picks, servers)
    assert got[3] == 0
    assert chi_square(got[:3], [6000 * w / 60_001 for w in weights[:3]]) < chi_square_critical(2)


def test_weighted_random_with_100_servers_alias_tables() -> None:
    weights = [997 + 1000 * (i % 10) for i in range(100)]  # sum 549,700: alias tables
    servers = make_servers(weights)
    balancer = balancer_for(servers, "weighted_random", seed=7)
    n = 200_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    total = sum(weights)
    assert chi_square(got, [n * w / total for w in weights]) < chi_square_critical(99)


# -- least connections ---------------------------------------------------------------------


def test_least_connections_picks_fewest_in_flight() -> None:
    a, b, c = servers = make_servers([1, 1, 1])
    balancer = balancer_for(servers, "least_connections")
    assert isinstance(balancer, LeastConnectionsBalancer)
    a.in_flight, b.in_flight, c.in_flight = 3, 1, 2
    assert all(balancer.pick(REQUEST) is b for _ in range(50))
    assert all(balancer.pick(REQUEST, exclude=[b]) is c for _ in range(50))
    assert balancer.pick(REQUEST, exclude=servers) is b


def test_least_connections_is_relative_to_weight() -> None:
    a, b = servers = make_servers([3, 1])
    balancer = balancer_for(servers, "least_connections")
    a.in_flight, b.in_flight = 5, 2  # 5/3 < 2/1
    assert all(balancer.pick(REQUEST) is a for _ in range(50))
    a.in_flight = 7  # 7/3 > 2/1
    assert all(balancer.pick(REQUEST) is b for _ in range(50))


def test_least_connections_ties_are_random_by_weight() -> None:
    servers = make_servers([1, 1, 1])
    balancer = balancer_for(servers, "least_connections", seed=3)
    n = 30_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    assert chi_square(got, [n / 3] * 3) < chi_square_critical(2)
    # All idle with weights 1:3: traffic still follows the weights.
    servers = make_servers([1, 3])
    balancer = balancer_for(servers, "least_connections", seed=3)
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    assert chi_square(got, [n / 4, 3 * n / 4]) < chi_square_critical(1)
    # Ties among the least loaded only.
    servers = make_servers([1, 1, 1, 1])
    servers[3].in_flight = 1
    balancer = balancer_for(servers, "least_connections", seed=3)
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    assert got[3] == 0
    assert chi_square(got[:3], [n / 3] * 3) < chi_square_critical(2)


def simulate_load(balancer: Balancer, servers: Sequence[Server], requests: int, seed: int) -> list[int]:
    """Requests arrive and stay in flight, some finish at random; return the peak in flight per server."""
    rng = random.Random(seed)
    in_flight: list[Server] = []
    peak = [0] * len(servers)
    for _ in range(requests):
        server = balancer.pick(REQUEST)
        assert server is not None
        server.in_flight += 1
        peak[server.index] = max(peak[server.index], server.in_flight)
        in_flight.append(server)
        if len(in_flight) > 3 * len(servers):
            done = in_flight.pop(rng.randrange(len(in_flight)))
            done.in_flight -= 1
    for server in in_flight:
        server.in_flight -= 1
    return peak


def test_least_connections_exact_scan_keeps_load_even() -> None:
    servers = make_servers([1] * LEAST_CONNECTIONS_EXACT_LIMIT)
    peak = simulate_load(balancer_for(servers, "least_connections"), servers, 20_000, seed=1)
    assert max(peak) <= 5  # 3 per server on average in flight
    random_servers = make_servers([1] * LEAST_CONNECTIONS_EXACT_LIMIT)
    random_peak = simulate_load(balancer_for(random_servers, "random"), random_servers, 20_000, seed=1)
    assert max(random_peak) >= 10  # what least connections saves


def test_least_connections_power_of_two_choices_above_the_limit() -> None:
    servers = make_servers([1] * 100)
    balancer = balancer_for(servers, "least_connections", seed=11)
    # A loaded server is chosen only when both draws land on it: about (1/100)^2 of picks.
    servers[0].in_flight = 50
    n = 20_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], servers)
    assert got[0] <= 10
    assert chi_square(got[1:], [n / 99] * 99) < chi_square_critical(98)
    servers[0].in_flight = 0
    # Under load it keeps the peak close to the mean, far below random's.
    peak = simulate_load(balancer, servers, 50_000, seed=2)
    random_servers = make_servers([1] * 100)
    random_peak = simulate_load(balancer_for(random_servers, "random"), random_servers, 50_000, seed=2)
    assert max(peak) <= 8 < max(random_peak)
    # Weighted: a server of weight 4 among weight 1s carries about 4 times the load.
    weighted = make_servers([4] + [1] * 99)
    balancer = balancer_for(weighted, "least_connections", seed=5)
    got = counts([balancer.pick(REQUEST) for _ in range(n)], weighted)
    assert 2.5 < got[0] / (sum(got[1:]) / 99) < 5.5
    # exclude: never the excluded one while others remain.
    assert all(balancer.pick(REQUEST, exclude=weighted[:50]) not in weighted[:50] for _ in range(1000))
    only = weighted[-1]
    assert all(balancer.pick(REQUEST, exclude=weighted[:-1]) is only for _ in range(100))
    assert balancer.pick(REQUEST, exclude=weighted) in weighted


def test_least_connections_power_of_two_choices_with_alias_tables() -> None:
    # Weights too large for a draw table: the two candidates come from alias tables, still by weight.
    weighted = make_servers([4001] + [1000] * 99)
    balancer = balancer_for(weighted, "least_connections", seed=5)
    n = 20_000
    got = counts([balancer.pick(REQUEST) for _ in range(n)], weighted)
    assert 2.5 < got[0] / (sum(got[1:]) / 99) < 5.5
    weighted[0].in_flight = 50
    got = counts([balancer.pick(REQUEST) for _ in range(n)], weighted)
    # Chosen only when every draw lands on it (the second draw is redrawn once when it repeats the
    # first): about (4/103)^3 of picks, about 1 in 20,000.
    assert got[0] <= 10
    weighted[0].in_flight = 0
    assert all(balancer.pick(REQUEST, exclude=weighted[:50]) not in weighted[:50] for _ in range(1000))
    assert all(balancer.pick(REQUEST, exclude=weighted[:-1]) is weighted[-1] for _ in range(100))


# -- peak EWMA -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def peak_ewma(
    servers: Sequence[Server], clock: FakeClock, seed: int = 1, decay: float = 10.0
) -> PeakEwmaBalancer:
    balancer = PeakEwmaBalancer(random.Random(seed), decay=decay, clock=clock)
    balancer.set_servers(servers)
    return balancer


def test_peak_ewma_decays_with_time_towards_lower_samples_and_while_idle() -> None:
    clock = FakeClock()
    server = make_servers([1])[0]
    balancer = peak_ewma([server], clock)
    assert balancer.estimate(server) == 0.0
    balancer.observe(server, 0.100)
    assert balancer.estimate(server) == pytest.approx(0.100)
    # No answers for one time constant: the estimate is down to 1/e of what it was.
    clock.now += 10.0
    assert balancer.estimate(server) == pytest.approx(0.100 / math.e)
    # A lower sample after that gap is blended in with weight 1 - exp(-10 s / 10 s).
    balancer.observe(server, 0.020)
    w = math.exp(-1.0)
    assert balancer.estimate(server) == pytest.approx(0.100 * w + 0.020 * (1 - w))
    # Lower samples close together move it little each; five time constants of them bring it
    # down to theirs.
    for _ in range(5000):
        clock.now += 0.01
        balancer.observe(server, 0.020)
    assert balancer.estimate(server) == pytest.approx(0.020, rel=0.01)


def test_peak_ewma_a_higher_sample_replaces_the_estimate_at_once() -> None:
    clock = FakeClock()
    server = make_servers([1])[0]
    balancer = peak_ewma([server], clock)
    for _ in range(100):
        clock.now += 0.01
        balancer.observe(server, 0.010)
    clock.now += 0.001
    balancer.observe(server, 0.500)
    assert balancer.estimate(server) == 0.500
    # One fast answer a millisecond later barely moves it: a peak is remembered for a while.
    clock.now += 0.001
    balancer.observe(server, 0.010)
    assert balancer.estimate(server) == pytest.approx(0.500, rel=1e-3)


def test_peak_ewma_picks_by_latency_times_in_flight() -> None:
    clock = FakeClock()
    fast, slow = make_servers([1, 1])
    balancer = peak_ewma([fast, slow], clock)
    balancer.observe(fast, 0.010)
    balancer.observe(slow, 0.030)
    # Two servers: both are always the candidates, so the cheaper one always wins.
    assert {balancer.pick(REQUEST) for _ in range(100)} == {fast}
    fast.in_flight = 2  # 0.010 * 3 = 0.030: a tie goes to the first candidate, drawn at random
    assert {balancer.pick(REQUEST) for _ in range(100)} == {fast, slow}
    fast.in_flight = 3  # 0.040 > 0.030
    assert {balancer.pick(REQUEST) for _ in range(100)} == {slow}


def test_peak_ewma_an_avoided_server_is_tried_again_as_its_estimate_decays() -> None:
    clock = FakeClock()
    fast, slow = make_servers([1, 1])
    balancer = peak_ewma([fast, slow], clock)
    balancer.observe(fast, 0.010)
    balancer.observe(slow, 0.050)
    # The fast one keeps answering in 10 ms, the slow one gets nothing: its 50 ms decays towards
    # zero and drops below 10 ms after 10 s * ln(5), about 16 s.
    for _ in range(15):
        clock.now += 1.0
        balancer.observe(fast, 0.010)
        assert balancer.pick(REQUEST) is fast
    clock.now += 2.0
    balancer.observe(fast, 0.010)
    assert balancer.estimate(slow) < balancer.estimate(fast)
    assert balancer.pick(REQUEST) is slow


def test_peak_ewma_slow_server_gets_almost_nothing_among_many() -> None:
    clock = FakeClock()
    servers = make_servers([1] * 5)
    balancer = peak_ewma(servers, clock, seed=4)
    for server in servers:
        balancer.observe(server, 0.010)
    balancer.observe(servers[0], 0.100)
    got = counts([balancer.pick(REQUEST) for _ in range(5000)], servers)
    # The two candidates are distinct, so the slow one loses every comparison.
    assert got[0] == 0
    assert min(got[1:]) > 1000
    # Under load it gets a request only once the others hold 10 or more in flight each.
    for server in servers[1:]:
        server.in_flight = 8
    assert servers[0] not in {balancer.pick(REQUEST) for _ in range(100)}
    for server in servers[1:]:
        server.in_flight = 10
    # Then it wins every comparison it is in: 2 picks in 5.
    assert 1000 < [balancer.pick(REQUEST) for _ in range(5000)].count(servers[0]) < 3000


def test_peak_ewma_unmeasured_server_gets_one_probe_at_a_time() -> None:
    clock = FakeClock()
    servers = make_servers([1, 1, 1])
    balancer = peak_ewma(servers[:2], clock)
    for server in servers[:2]:
        balancer.observe(server, 0.010)
    new = servers[2]
    balancer.set_servers(servers)
    assert balancer.estimate(new) == 0.0
    picks = [balancer.pick(REQUEST) for _ in range(300)]
    # Chosen whenever it is a candidate (2 in 3 picks) while nothing is in flight on it ...
    assert 150 < picks.count(new) < 250
    # ... and never while its probe is in flight with nothing measured yet.
    new.in_flight = 1
    assert new not in {balancer.pick(REQUEST) for _ in range(300)}
    new.in_flight = 0
    balancer.observe(new, 0.005)
    assert balancer.estimate(new) == 0.005


def test_peak_ewma_readmitted_server_starts_at_no_worse_than_the_median() -> None:
    clock = FakeClock()
    servers = make_servers([1] * 5)
    balancer = peak_ewma(servers, clock)
    for server, seconds in zip(servers, (0.010, 0.020, 0.030, 0.040, 0.005), strict=True):
        balancer.observe(server, seconds)
    # The last one fails its way out (an ejection) ...
    out = servers[4]
    for _ in range(5):
        balancer.observe(out, 0.001, failed=True)
    assert balancer.estimate(out) >= 1.0
    balancer.set_servers(servers[:4])
    clock.now += 1.0
    # ... and comes back at the median of the others (0.020 and 0.030, decayed for 1 s), not
    # at its penalty.
    balancer.set_servers(servers)
    decayed = math.exp(-1.0 / 10.0)
    assert balancer.estimate(out) == pytest.approx(0.025 * decayed)
    assert balancer.estimate(servers[0]) == pytest.approx(0.010 * decayed)
    # A server that comes back better than the median keeps its own estimate.
    balancer.set_servers(servers[1:])
    balancer.set_servers(servers)
    assert balancer.estimate(servers[0]) == pytest.approx(0.010 * decayed)
    # A fresh server (never measured) is not given anyone's estimate: it is probed.
    extra = make_servers([1], base_port=9100)[0]
    balancer.set_servers([*servers, extra])
    assert balancer.estimate(extra) == 0.0


def test_peak_ewma_a_failure_is_a_slow_sample() -> None:
    clock = FakeClock()
    fast, failing, other = make_servers([1, 1, 1])
    balancer = peak_ewma([fast, failing, other], clock)
    balancer.observe(fast, 0.010)
    balancer.observe(other, 0.010)
    # A connect failure in a tenth of a millisecond on a server not measured yet: the floor.
    balancer.observe(failing, 0.0001, failed=True)
    assert balancer.estimate(failing) == PEAK_EWMA_FAILURE_FLOOR
    assert failing not in {balancer.pick(REQUEST) for _ in range(200)}
    # Each further failure counts as twice the estimate, up to 10 s; a slow one as its own time.
    balancer.observe(failing, 0.0001, failed=True)
    assert balancer.estimate(failing) == pytest.approx(2 * PEAK_EWMA_FAILURE_FLOOR)
    for _ in range(20):
        balancer.observe(failing, 0.0001, failed=True)
    assert balancer.estimate(failing) == 10.0
    balancer.observe(failing, 30.0, failed=True)
    assert balancer.estimate(failing) == 30.0
    # A fast failure on a fast server: twice its estimate.
    balancer.observe(fast, 0.5, failed=False)
    clock.now += 100.0
    balancer.observe(fast, 0.010)
    before = balancer.estimate(fast)
    balancer.observe(fast, 0.001, failed=True)
    assert balancer.estimate(fast) == pytest.approx(max(2 * before, PEAK_EWMA_FAILURE_FLOOR))


def test_peak_ewma_weights_count_per_unit_of_weight_under_load() -> None:
    clock = FakeClock()
    servers = make_servers([4] + [1] * 99)
    balancer = peak_ewma(servers, clock, seed=5)
    for server in servers:
        balancer.observe(server, 0.010)
    rng = random.Random(3)
    in_flight: list[Server] = []
    picks = [0] * len(servers)
    for _ in range(30_000):
        server = balancer.pick(REQUEST)
        assert server is not None
        server.in_flight += 1
        picks[server.index] += 1
        in_flight.append(server)
        if len(in_flight) > 300:
            in_flight.pop(rng.randrange(len(in_flight))).in_flight -= 1
    # Same latency everywhere: the weight-4 server carries about 4 times a weight-1 server's load.
    assert 3.0 < picks[0] / (sum(picks[1:]) / 99) < 6.0, picks[0]
    for server in in_flight:
        server.in_flight -= 1


def test_peak_ewma_exclude_and_alias_tables() -> None:
    clock = FakeClock()
    weighted = make_servers([4001] + [1000] * 99)
    balancer = peak_ewma(weighted, clock, seed=5)
    for server in weighted:
        balancer.observe(server, 0.010)
    assert all(balancer.pick(REQUEST, exclude=weighted[:50]) not in weighted[:50] for _ in range(1000))
    assert all(balancer.pick(REQUEST, exclude=weighted[:-1]) is weighted[-1] for _ in range(100))
    assert balancer.pick(REQUEST, exclude=weighted) in weighted
    # Most of the set excluded: two of the rest are compared, so the slow one of them loses.
    balancer.observe(weighted[-1], 1.0)
    left = weighted[-2:]
    assert {balancer.pick(REQUEST, exclude=weighted[:-2]) for _ in range(100)} == {left[0]}


def test_peak_ewma_pick_work_with_measured_servers_does_not_grow() -> None:
    requests = [make_request() for _ in range(300)]
    work = {}
    for n in (40, 2000):
        clock = FakeClock()
        servers = make_servers([1 + i % 3 for i in range(n)])
        balancer = peak_ewma(servers, clock, seed=n)
        for i, server in enumerate(servers):
            balancer.observe(server, 0.001 * (1 + i % 17))
            server.in_flight = i % 5
        work[n] = pick_work(balancer, requests)
    (small_lines, small_bytes), (large_lines, large_bytes) = work[40], work[2000]
    assert sum(large_lines) / len(large_lines) <= 1.5 * sum(small_lines) / len(small_lines) + 4
    assert max(large_lines) <= 80
    assert large_bytes <= min(2 * small_bytes + 1024, 4096)


def test_only_a_balancer_that_measures_latency_is_told_about_attempts() -> None:
    assert PeakEwmaBalancer.measures_latency
    for kind in ("round_robin", "random", "weighted_random", "least_connections", "consistent_hash"):
        assert not balancer_for(make_servers([1]), kind, "path").measures_latency
        assert (
            FailoverLayer(
                upstream_for(make_servers([1]), kind, "path"),
                make_servers([1]),
                balancer_for(make_servers([1]), kind, "path"),
                Answers(FakeClock()),
            )._observe
            is None
        )


class Answers(Handler):
    """Answers `status` after `seconds` of the fake clock, or raises `error`."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.seconds = 0.0
        self.status = 200
        self.error: BaseException | None = None

    async def handle_request(self, request: Request) -> Response:
        self.clock.now += self.seconds
        if self.error is not None:
            raise self.error
        return Response(status=self.status, headers=[], stream=_Body())


class _Body:
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        yield b"ok"

    async def aclose(self) -> None:
        pass


@pytest.mark.anyio
async def test_failover_reports_each_attempts_time_to_its_head_and_its_failures() -> None:
    clock = FakeClock()
    servers = make_servers([1])
    (server,) = servers
    upstream = replace(upstream_for(servers, "peak_ewma"), outlier_detection=None)
    balancer = PeakEwmaBalancer(random.Random(1), clock=clock)
    inner = Answers(clock)
    failover = FailoverLayer(upstream, servers, balancer, inner, clock=clock)
    inner.seconds = 0.250
    response = await failover.handle_request(make_request())
    # Measured to the head: reading and closing the body later changes nothing.
    assert balancer.estimate(server) == pytest.approx(0.250)
    clock.now += 5.0
    await response.aclose()
    assert balancer.estimate(server) == pytest.approx(0.250 * math.exp(-0.5))
    # A fast 503 is a failed attempt: a slow sample.
    clock.now += 100.0
    inner.seconds, inner.status = 0.001, 503
    await (await failover.handle_request(make_request())).aclose()
    assert balancer.estimate(server) == pytest.approx(PEAK_EWMA_FAILURE_FLOOR, rel=1e-3)
    # A connect failure likewise; an error that is not the server's fault is no sample.
    clock.now += 100.0
    inner.error = ConnectError("refused")
    with pytest.raises(ConnectError):
        await failover.handle_request(make_request())
    assert balancer.estimate(server) == pytest.approx(PEAK_EWMA_FAILURE_FLOOR, rel=1e-3)
    clock.now += 100.0
    before = balancer.estimate(server)
    inner.seconds = 0.0
    inner.error = TotalTimeout("the client's deadline")
    with pytest.raises(TotalTimeout):
        await failover.handle_request(make_request())
    assert balancer.estimate(server) == before
    assert server.in_flight == 0


# -- consistent hashing --------------------------------------------------------------------


def test_key_functions() -> None:
    header = key_function("header:X-User-Id")
    assert header(make_request([(b"x-user-id", b"42")])) == b"42"
    assert header(make_request([(b"x-other", b"1")])) is None
    assert header(make_request([(b"x-user-id", b"")])) is None
    cookie = key_function("cookie:session")
    assert cookie(make_request([(b"cookie", b"a=1; session=abc ; b=2")])) == b"abc"
    assert cookie(make_request([(b"cookie", b"a=1"), (b"cookie", b"session=xyz")])) == b"xyz"
    assert cookie(make_request([(b"cookie", b"sessionx=1; xsession=2; session")])) is None
    assert cookie(make_request([(b"x-session", b"1")])) is None
    assert key_function("client_ip")(make_request(client_ip="192.0.2.7")) == b"192.0.2.7"
    assert key_function("client_ip")(make_request(client_ip="")) is None
    assert key_function("path")(make_request(path="/api/caf\u00e9")) == "/api/caf\u00e9".encode()
    with pytest.raises(ValueError, match="hash_on"):
        key_function("query:x")


def test_hash_is_stable_across_processes_and_versions() -> None:
    # BLAKE2b-64 of the key; pinned so that a change of hash (which would move every key) is noticed.
    assert hash_key(b"user-42") == 0x6FA0CA4D7BE6EFA6
    servers = make_servers([1] * 5)
    one = balancer_for(servers, "consistent_hash", "header:x-user-id")
    other = balancer_for(make_servers([1] * 5), "consistent_hash", "header:x-user-id")
    for i in range(200):
        request = make_request([(b"x-user-id", str(i).encode())])
        first, second = one.pick(request), other.pick(request)
        assert first is not None and second is not None
        assert first.url == second.url


def keyed(balancer: ConsistentHashBalancer, keys: Sequence[bytes]) -> list[Server]:
    picks = []
    for key in keys:
        server = balancer.pick_key(key)
        assert server is not None
        picks.append(server)
    return picks


def hash_balancer(servers: Sequence[Server], hash_on: str = "header:x-user-id") -> ConsistentHashBalancer:
    balancer = balancer_for(servers, "consistent_hash", hash_on)
    assert isinstance(balancer, ConsistentHashBalancer)
    return balancer


def test_consistent_hash_same_key_same_server_and_spread() -> None:
    servers = make_servers([1, 1, 1])
    balancer = hash_balancer(servers)
    request = make_request([(b"x-user-id", b"alice")])
    first = balancer.pick(request)
    assert all(balancer.pick(request) is first for _ in range(20))
    keys = [f"user-{i}".encode() for i in range(30_000)]
    got = counts(keyed(balancer, keys), servers)
    assert all(0.75 < n / 10_000 < 1.25 for n in got), got


def test_consistent_hash_weights_are_proportional() -> None:
    servers = make_servers([1, 3])
    balancer = hash_balancer(servers)
    got = counts(keyed(balancer, [f"k{i}".encode() for i in range(20_000)]), servers)
    assert 0.18 < got[0] / 20_000 < 0.32, got


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=24),
    data=st.data(),
    salt=st.integers(min_value=0, max_value=2**32),
)
def test_consistent_hash_remap_fraction(n: int, data: st.DataObject, salt: int) -> None:
    ports = data.draw(st.lists(st.integers(1024, 65535), min_size=n, max_size=n, unique=True))
    servers = make_servers([1] * n)
    for server, port in zip(servers, ports, strict=True):
        server.port = port
        server.url = f"http://127.0.0.1:{port}"
    balancer = hash_balancer(servers)
    keys = [f"{salt}-{i}".encode() for i in range(3000)]
    before = keyed(balancer, keys)
    gone = servers[data.draw(st.integers(0, n - 1))]
    balancer.set_servers([s for s in servers if s is not gone])
    during = keyed(balancer, keys)
    moved = [i for i in range(len(keys)) if before[i] is not during[i]]
    # Only the keys of the server that left move, and they are about 1/N of all keys.
    assert all(before[i] is gone for i in moved)
    assert all(during[i] is not gone for i in range(len(keys)))
    assert len(moved) == sum(1 for s in before if s is gone)
    assert len(moved) / len(keys) <= 2 / n
    # It comes back: every key returns to exactly where it was.
    balancer.set_servers(servers)
    assert keyed(balancer, keys) == before


def test_consistent_hash_adding_a_configured_server_moves_only_its_share() -> None:
    servers = make_servers([1] * 10)
    balancer = hash_balancer(servers)
    balancer.set_servers(servers[:9])
    keys = [f"k{i}".encode() for i in range(10_000)]
    before = keyed(balancer, keys)
    balancer.set_servers(servers)
    after = keyed(balancer, keys)
    moved = [i for i in range(len(keys)) if before[i] is not after[i]]
    assert all(after[i] is servers[9] for i in moved)
    assert 0.05 < len(moved) / len(keys) < 0.15


def test_consistent_hash_exclude_walks_the_ring() -> None:
    servers = make_servers([1] * 6)
    balancer = hash_balancer(servers)
    keys = [f"k{i}".encode() for i in range(2000)]
    first = keyed(balancer, keys)
    second = [balancer.pick_key(key, exclude=[s]) for key, s in zip(keys, first, strict=True)]
    # Excluding a key's server sends it where it would go if that server were unavailable.
    for key, owner, retry in zip(keys, first, second, strict=True):
        assert retry is not owner
        balancer.set_servers([s for s in servers if s is not owner])
        assert balancer.pick_key(key) is retry
        balancer.set_servers(servers)
    # Every server excluded: the key's own server.
    assert balancer.pick_key(keys[0], exclude=servers) is first[0]
    balancer.set_servers([])
    assert balancer.pick_key(keys[0]) is None
    assert balancer.pick(make_request()) is None


def bisect_reference(
    balancer: ConsistentHashBalancer, available: Sequence[Server]
) -> Callable[[bytes], Server]:
    """What a key's server is by definition: the first live point at or after the key's hash, by
    bisection over the full ring (its points and owning slots, which the bucket index leaves alone)."""
    server_of_slot = {balancer._slot_of[server]: server for server in available}
    live = [(point, slot) for point, slot in zip(balancer._points, balancer._owners, strict=True)]
    live = [(point, slot) for point, slot in live if slot in server_of_slot]
    points = [point for point, _ in live]

    def owner(key: bytes) -> Server:
        index = bisect.bisect_left(points, hash_key(key))
        return server_of_slot[live[index % len(live)][1]]

    return owner


def test_consistent_hash_bucket_index_finds_what_bisection_finds() -> None:
    # The lookup (bucket index, then a short walk) must give exactly the bisection's answer, for any
    # available subset: the whole ring, a few servers, one server, including keys past the last point
    # (which wrap around to the first).
    servers = make_servers([1 + i % 3 for i in range(60)])
    balancer = hash_balancer(servers)
    rng = random.Random(3)
    keys = [f"key-{i}".encode() for i in range(4000)]
    wrapped = 0
    for available in (servers, rng.sample(servers, 30), rng.sample(servers, 4), servers[7:8], servers[-1:]):
        balancer.set_servers(available)
        owner = bisect_reference(balancer, available)
        last = max(
            point
            for point, slot in zip(balancer._points, balancer._owners, strict=True)
            if balancer._slot_server[slot] is not None
        )
        for key in keys:
            assert balancer.pick_key(key) is owner(key), key
            wrapped += hash_key(key) > last
    assert wrapped > 0
    # A live ring of a single point (a weight-1 server next to a heavy one gets one virtual node).
    pair = make_servers([1, 1_000_000])
    balancer = hash_balancer(pair)
    balancer.set_servers(pair[:1])
    assert all(balancer.pick_key(key) is pair[0] for key in keys[:200])
    balancer.set_servers(pair)
    owner = bisect_reference(balancer, pair)
    picks = [balancer.pick_key(key) for key in keys]
    assert picks == [owner(key) for key in keys]


def test_consistent_hash_without_key_goes_round_robin() -> None:
    servers = make_servers([1, 1, 1])
    balancer = hash_balancer(servers, "cookie:session")
    no_cookie = make_request([(b"cookie", b"other=1")])
    assert names([balancer.pick(no_cookie) for _ in range(6)]) == "abcabc"
    with_cookie = make_request([(b"cookie", b"session=s1")])
    assert len({id(balancer.pick(with_cookie)) for _ in range(6)}) == 1


@pytest.mark.parametrize(
    ("hash_on", "vary"),
    [
        ("header:X-User-Id", lambda i: make_request([(b"x-user-id", str(i).encode())])),
        ("cookie:sid", lambda i: make_request([(b"cookie", f"a=b; sid={i}".encode())])),
        ("client_ip", lambda i: make_request(client_ip=f"10.0.{i // 256}.{i % 256}")),
        ("path", lambda i: make_request(path=f"/items/{i}")),
    ],
)
def test_consistent_hash_each_key_kind_is_sticky(hash_on: str, vary: Callable[[int], Request]) -> None:
    servers = make_servers([1, 1, 1, 1])
    balancer = hash_balancer(servers, hash_on)
    picks = [balancer.pick(vary(i)) for i in range(400)]
    assert picks == [balancer.pick(vary(i)) for i in range(400)]
    assert all(n > 50 for n in counts(picks, servers))


def test_consistent_hash_duplicate_and_unconfigured_servers() -> None:
    # The same URL twice gets two places on the ring; a Server not in the configuration is added.
    servers = make_servers([1, 1])
    twin = make_servers([1], base_port=9000)[0]
    twin.index = 2
    upstream = UpstreamConfig(
        name="u",
        servers=tuple(ServerConfig(url=s.url) for s in [*servers, twin]),
        balancer="consistent_hash",
        hash_on="path",
    )
    balancer = make_balancer(upstream)
    assert isinstance(balancer, ConsistentHashBalancer)
    balancer.set_servers([*servers, twin])
    keys = [f"k{i}".encode() for i in range(3000)]
    got = counts(keyed(balancer, keys), [*servers, twin])
    assert all(n > 600 for n in got), got
    stranger = make_servers([1], base_port=9500)[0]
    balancer.set_servers([*servers, twin, stranger])
    got = counts(keyed(balancer, keys), [*servers, twin, stranger])
    assert all(n > 400 for n in got), got


def test_consistent_hash_with_backups_in_the_ring() -> None:
    # The failover layer hands over backups when no primary is available: they get every key, and
    # the primaries get their own keys back when they recover.
    primaries = make_servers([1, 1, 1])
    backups = make_servers([1, 1], base_port=9100, backup=True)
    for i, server in enumerate(backups):
        server.index = 3 + i
    upstream = UpstreamConfig(
        name="u",
        servers=tuple(ServerConfig(url=s.url, backup=s.backup) for s in [*primaries, *backups]),
        balancer="consistent_hash",
        hash_on="path",
    )
    balancer = make_balancer(upstream)
    assert isinstance(balancer, ConsistentHashBalancer)
    keys = [f"k{i}".encode() for i in range(2000)]
    balancer.set_servers(primaries)
    before = keyed(balancer, keys)
    balancer.set_servers(backups)
    assert set(map(id, keyed(balancer, keys))) == set(map(id, backups))
    balancer.set_servers(primaries)
    assert keyed(balancer, keys) == before


# -- every kind ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_empty_single_and_factory(kind: str) -> None:
    servers = make_servers([1, 2, 3])
    balancer = make_balancer(upstream_for(servers, kind, "path" if kind == "consistent_hash" else None))
    assert balancer.pick(REQUEST) is None
    balancer.set_servers([])
    assert balancer.pick(REQUEST) is None
    balancer.set_servers(servers[:1])
    assert balancer.pick(REQUEST) is servers[0]
    assert balancer.pick(REQUEST, exclude=servers[:1]) is servers[0]
    balancer.set_servers(servers)
    for _ in range(100):
        assert balancer.pick(REQUEST, exclude=servers[:2]) is servers[2]
        assert balancer.pick(REQUEST) in servers


def test_make_balancer_rejects_consistent_hash_without_key() -> None:
    servers = make_servers([1])
    # Config validation refuses this too; a hand-built UpstreamConfig gets a clear error.
    bare = UpstreamConfig.__new__(UpstreamConfig)
    for field_name, value in zip(
        ("name", "servers", "balancer", "hash_on"),
        ("u", (ServerConfig(url=servers[0].url),), "consistent_hash", None),
        strict=True,
    ):
        object.__setattr__(bare, field_name, value)
    with pytest.raises(ValueError, match="hash_on"):
        make_balancer(bare)
    object.__setattr__(bare, "balancer", "fastest")
    with pytest.raises(ValueError, match="unknown balancer"):
        make_balancer(bare)


def per_pick_seconds(balancer: Balancer, requests: Sequence[Request], picks: int = 3000) -> float:
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for i in range(picks):
            balancer.pick(requests[i % len(requests)])
        best = min(best, time.perf_counter() - start)
    return best / picks


@pytest.mark.parametrize("kind", KINDS)
def test_pick_cost_does_not_grow_linearly_with_servers(kind: str) -> None:
    # O(1) / O(log n): 1,000 servers cost at most a few times what 10 do (O(n) would be ~100x).
    requests = [make_request([(b"x-user-id", str(i).encode())]) for i in range(256)]
    costs = []
    for n in (10, 1000):
        servers = make_servers([1 + i % 3 for i in range(n)])
        balancer = balancer_for(servers, kind, "header:x-user-id")
        costs.append(per_pick_seconds(balancer, requests))
    assert costs[1] < 4 * costs[0] + 2e-6, costs


def pick_work(
    balancer: Balancer, requests: Sequence[Request], exclude: Sequence[Server] = ()
) -> tuple[list[int], int]:
    """Per pick, the lines of the balancer package that ran; and the most bytes any one pick had allocated.

    Counting lines rather than timing makes the cost model testable without flakiness: a loop over
    the servers in Python shows up as lines, a copy of them (at C speed) as allocated bytes."""
    directory = os.path.dirname(balancer_module.__file__) + os.sep
    lines = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if event == "line":
            lines += 1
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(directory) else None

    for request in requests[:20]:  # warm up: consistent_hash builds its live ring on first use
        balancer.pick(request, exclude)
    per_pick = []
    previous = sys.gettrace()
    for request in requests:
        lines = 0
        sys.settrace(calls)
        try:
            balancer.pick(request, exclude)
        finally:
            sys.settrace(previous)
        per_pick.append(lines)
    peak = 0
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        for request in requests:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            balancer.pick(request, exclude)
            peak = max(peak, tracemalloc.get_traced_memory()[1] - before)
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return per_pick, peak


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights", [(1, 2, 3), (1, 2, 3, 10_000)], ids=["small-weights", "large-weights"])
def test_pick_work_does_not_grow_with_servers(kind: str, weights: tuple[int, ...]) -> None:
    # Both sizes above LEAST_CONNECTIONS_EXACT_LIMIT. Large weights switch weighted draws to alias
    # tables and round robin to its heap (O(log n): a few lines more at 2,000 servers, not thousands).
    requests = [make_request([(b"x-user-id", str(i).encode())]) for i in range(300)]
    work = {}
    for n in (40, 2000):
        servers = make_servers([weights[i % len(weights)] for i in range(n)])
        balancer = balancer_for(servers, kind, "header:x-user-id", seed=n)
        work[n] = [pick_work(balancer, requests), pick_work(balancer, requests, exclude=servers[:1])]
    for (small_lines, small_bytes), (large_lines, large_bytes) in zip(work[40], work[2000], strict=True):
        small_mean = sum(small_lines) / len(small_lines)
        large_mean = sum(large_lines) / len(large_lines)
        # O(n) per pick would be thousands of lines, or kilobytes (a list of 2,000 servers: 16 KiB).
        assert large_mean <= 1.5 * small_mean + 4, (small_mean, large_mean)
        assert max(large_lines) <= 80, max(large_lines)
        assert large_bytes <= min(2 * small_bytes + 1024, 4096), (small_bytes, large_bytes)
