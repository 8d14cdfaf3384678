"""`bench/run.py --smoke` runs end to end: real proxies under uvicorn, real load, the report.

Not a timed test: nothing here depends on how fast the machine is. It checks that every
figure was measured and that the gateway answered every request of the load without an
error. Where wrk or nginx is missing the runner uses its pure-Python stand-ins; the second
test forces them, so both paths stay working whatever this machine has installed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).resolve().parent.parent / "bench" / "run.py"


def run_smoke(out: Path, *extra: str) -> tuple[str, dict[str, object]]:
    done = subprocess.run(
        [sys.executable, str(RUNNER), "--smoke", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"bench/run.py --smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    raw_files = list(out.glob("*-smoke.json"))
    assert len(raw_files) == 1, f"expected one raw result file in {out}, found {raw_files}"
    return done.stdout, json.loads(raw_files[0].read_text())


def check_report(stdout: str, raw: dict[str, object]) -> None:
    samples = raw["samples"]
    assert isinstance(samples, list)
    for case in ("direct", "gateway-off", "gateway-all", "gateway-sdk", "fastapi-off", "floor-pool"):
        for size in ("1k", "1m"):
            measured = [s for s in samples if s["case"] == case and s["size"] == size]
            assert measured, f"no {size} sample for {case}"
            result = measured[0]["result"]
            assert result["requests"] > 0, f"{case} {size}: no request completed"
            assert result["errors"] == 0 and result["non_2xx"] == 0, f"{case} {size}: {result}"
            if case.startswith("gateway"):
                assert measured[0]["cpu_us_per_request"] > 0
    memory = raw["memory"]
    assert isinstance(memory, list) and memory, "the memory test did not run"
    assert memory[0]["case"] == "gateway-off" and memory[0]["failed"] == 0, memory
    assert memory[0]["rss_during"] > 0
    # The Markdown report, with every section the README's table is made of.
    assert "| asgi_gateway, tracing off |" in stdout
    assert "| asgi_gateway, every request traced |" in stdout
    assert "### Targets" in stdout and "memory per in-flight request < 64 KiB" in stdout
    assert "the SDK's own spans around the gateway under the same load" in stdout
    assert "### Router match cost" in stdout
    assert "### Machine and versions" in stdout and "uvicorn" in stdout


def test_smoke_with_the_tools_this_machine_has(tmp_path: Path) -> None:
    stdout, raw = run_smoke(tmp_path)
    check_report(stdout, raw)


def test_smoke_with_the_pure_python_stand_ins(tmp_path: Path) -> None:
    stdout, raw = run_smoke(tmp_path, "--fallback")
    check_report(stdout, raw)
    assert "Load: the pure-Python stand-in" in stdout


@pytest.mark.parametrize("args", [["--fallback"], ["--smoke", "--only", "nonsense"]])
def test_bad_arguments_are_refused(args: list[str]) -> None:
    done = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "error:" in done.stderr
