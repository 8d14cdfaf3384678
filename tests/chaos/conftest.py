"""Fixtures of the chaos suite, and the table of faults and recovery times printed at the end.

- `gateway_process(config, **kwargs) -> GatewayProcess`: a real gateway in a subprocess
  (see `chaos_tools.GatewayProcess`), closed after the test.

Set `CHAOS_REPORT=path` to also get the table as JSON lines.

Tests marked `slow` here (the soak of 100,000 requests, the very slow reader) run only when asked
for: `pytest -m slow tests/chaos`. Without any `-m`, they are deselected (not skipped), so a plain
`pytest` (what `.ci/run` does) leaves them out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chaos.chaos_tools import RECORD, GatewayProcess


@pytest.fixture
def gateway_process() -> Iterator[Callable[..., GatewayProcess]]:
    with contextlib.ExitStack() as stack:

        def factory(config: dict[str, Any], **kwargs: Any) -> GatewayProcess:
            return stack.enter_context(GatewayProcess(config, **kwargs))

        yield factory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("markexpr"):
        return  # the run chose its markers itself
    here = Path(__file__).parent
    slow = [item for item in items if item.get_closest_marker("slow") and here in item.path.parents]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if item not in slow]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RECORD:
        return
    terminalreporter.section("chaos: faults and recovery times")
    for outcome in RECORD:
        recovery = f"{outcome.recovery:.2f}s" if outcome.recovery is not None else "-"
        note = f" ({outcome.note})" if outcome.note else ""
        terminalreporter.line(f"{outcome.fault:<34} {recovery:>8}  {outcome.client_sees}{note}")
