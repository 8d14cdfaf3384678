"""Fixtures of the chaos suite, and the table of faults and recovery times printed at the end.

- `gateway_process(config, **kwargs) -> GatewayProcess`: a real gateway in a subprocess
  (see `chaos_tools.GatewayProcess`), closed after the test.

Set `CHAOS_REPORT=path` to also get the table as JSON lines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chaos.chaos_tools import RECORD, GatewayProcess


@pytest.fixture
def gateway_process() -> Iterator[Callable[..., GatewayProcess]]:
    with contextlib.ExitStack() as stack:

        def factory(config: dict[str, Any], **kwargs: Any) -> GatewayProcess:
            return stack.enter_context(GatewayProcess(config, **kwargs))

        yield factory


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RECORD:
        return
    terminalreporter.section("chaos: faults and recovery times")
    for outcome in RECORD:
        recovery = f"{outcome.recovery:.2f}s" if outcome.recovery is not None else "-"
        note = f" ({outcome.note})" if outcome.note else ""
        terminalreporter.line(f"{outcome.fault:<34} {recovery:>8}  {outcome.client_sees}{note}")
