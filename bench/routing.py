"""Router match cost for 3, 100 and 1,000 routes, printed as a table.

    python bench/routing.py            # about 0.3 s per cell
    python bench/routing.py --quick    # a smoke check
    python bench/routing.py --json     # one JSON object per cell

Routes are `/svc{i}/items`, in order; the requests hit the first route, the last route, no
route at all (the request goes to the wrapped app), and the last route through a
percent-encoded path (which also checks the path is not ambiguous). Only `Router.match` is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from asgi_gateway._config import load_config
from asgi_gateway._routing import Router

SIZES = (3, 100, 1000)
CASES = ("first route", "last route", "no match", "last, %-encoded")


@dataclass(frozen=True, slots=True)
class Result:
    case: str
    routes: int
    ns_per_match: float


def make_router(size: int) -> Router:
    config = load_config(
        {
            "routes": [{"path": f"/svc{i}/items", "upstream": "u"} for i in range(size)],
            "upstreams": {"u": {"servers": [{"url": "http://127.0.0.1:9"}]}},
        }
    )
    return Router(config)


def paths(size: int) -> dict[str, bytes]:
    last = size - 1
    return {
        "first route": b"/svc0/items/42",
        "last route": f"/svc{last}/items/42".encode(),
        "no match": b"/static/app.js",
        "last, %-encoded": f"/svc{last}/items/a%20b".encode(),
    }


def ns_per_match(router: Router, path: bytes, budget: float) -> float:
    match = router.match
    for _ in range(100):
        match("GET", None, path)
    done = 0
    start = time.perf_counter()
    deadline = start + budget
    while True:
        for _ in range(1000):
            match("GET", None, path)
        done += 1000
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / done * 1e9


def run(budget: float) -> list[Result]:
    results = []
    for size in SIZES:
        router = make_router(size)
        for case, path in paths(size).items():
            results.append(Result(case, size, round(ns_per_match(router, path, budget), 1)))
    return results


def table(results: Sequence[Result]) -> str:
    cost = {(r.case, r.routes): r.ns_per_match for r in results}
    header = ["request", *(f"{n:,} routes" for n in SIZES)]
    rows = [[case, *(f"{cost[case, n] / 1000:.2f} µs" for n in SIZES)] for case in CASES]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Router match cost for 3, 100 and 1,000 routes.")
    parser.add_argument("--quick", action="store_true", help="a short run for a smoke check")
    parser.add_argument("--seconds", type=float, default=None, help="time spent matching per cell")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    args = parser.parse_args(argv)
    budget = args.seconds if args.seconds is not None else (0.03 if args.quick else 0.3)
    results = run(budget)
    if args.json:
        for result in results:
            print(json.dumps(asdict(result)))
    else:
        print(f"Router match cost (Python {sys.version.split()[0]}, {budget:g} s per cell)")
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
