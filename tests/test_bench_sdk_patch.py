"""bench/apps/sdk_patch.py changes what the SDK costs, never what it records.

The performance notes propose that change to the SDK with figures; this checks the claim that
it keeps the SDK's behaviour: the same spans, attribute by attribute (truncated strings,
dropped and evicted attributes, sequences, invalid keys), the same events, links and dropped
counts, and the same warnings on ended spans, with every part applied alone and all together.
Each run is a subprocess, so the patch never reaches this test process's SDK.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

APPS = Path(__file__).resolve().parent.parent / "bench" / "apps"

SCRIPT = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[1])
from opentelemetry import trace
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

warnings = []
class Collect(logging.Handler):
    def emit(self, record):
        warnings.append(record.getMessage())
logging.getLogger("opentelemetry").addHandler(Collect())

if sys.argv[2] != "none":
    import sdk_patch
    sdk_patch.apply(sys.argv[2])

seen = []
class Seen(SpanProcessor):
    # A processor that acts when spans start and end: it must still be called.
    def on_start(self, span, parent_context=None):
        seen.append(("start", span.name))
    def _on_ending(self, span):
        seen.append(("ending", span.name))
    def on_end(self, span):
        seen.append(("end", span.name, span.end_time is not None))

out = []
for limits in (
    SpanLimits(),
    SpanLimits(max_attribute_length=4),
    SpanLimits(max_span_attributes=3, max_attribute_length=4, max_events=1, max_links=1),
    SpanLimits(max_span_attributes=0),
):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    provider.add_span_processor(Seen())
    tracer = provider.get_tracer("check")
    parent = tracer.start_span(
        "parent", attributes={"a": "hello world", "b": 1, "c": [1, 2], "d": None, "e": 1.5, "f": True}
    )
    parent.set_attribute("a", "again")
    parent.set_attribute("g", 7)
    parent.set_attribute("h", {"k": 1})
    parent.set_attribute("", 1)
    parent.set_attributes({"i": "x" * 10, "b": 2})
    parent.add_event("event", {"x": 1})
    parent.add_event("second")
    child = tracer.start_span(
        "child",
        context=trace.set_span_in_context(parent),
        links=[trace.Link(parent.get_span_context(), {"l": 1})],
        attributes={"z": "zz"},
    )
    child.add_link(parent.get_span_context())
    child.end()
    parent.end()
    parent.set_attribute("late", 1)
    parent.add_event("late")
    parent.end()
    for span in exporter.get_finished_spans():
        data = json.loads(span.to_json())
        # The resource names the process (service.instance.id): another in every run.
        for key in ("context", "parent_id", "start_time", "end_time", "resource"):
            data[key] = None
        for item in data["events"] + data["links"]:
            item.pop("timestamp", None)
            item.pop("context", None)
        out.append([data, span.dropped_attributes, span.dropped_events, span.dropped_links,
                    list(span.attributes.items()), len(span.events), len(span.links)])
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.trace import Span, Tracer
patched = {name: function.__module__ == "sdk_patch" for name, function in (
    ("attributes", BoundedAttributes._set_items), ("lists", Span.__init__), ("end", Span.end),
    ("start", Tracer.start_span))}
print(json.dumps({"spans": out, "warnings": warnings, "seen": seen, "patched": patched}))
"""


def record(parts: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(APPS), parts],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize("parts", ["attributes", "lists", "end", "start", "all"])
def test_the_sdk_patch_records_what_the_sdk_records(parts: str) -> None:
    stock = record("none")
    spans = stock["spans"]
    assert isinstance(spans, list) and len(spans) == 8
    # The cases reach the paths that matter: truncation, eviction, a limit of 0, warnings.
    assert ["a", "agai"] in spans[3][4] and ["i", "xxxx"] in spans[3][4]
    assert spans[5][1] > 0 and spans[7][1] > 0
    assert "Setting attribute on ended span." in stock["warnings"]
    assert ["start", "child"] in stock["seen"] and ["ending", "child"] in stock["seen"]
    assert not any(stock.pop("patched").values())  # type: ignore[attr-defined]
    changed = record(parts)
    applied = changed.pop("patched")
    names = ("attributes", "lists", "end", "start")
    assert applied == {name: parts in ("all", name) for name in names}
    assert changed == stock


def test_an_unknown_part_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(APPS), "attributes,nosuch"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0 and "unknown SDK patch parts ['nosuch']" in done.stderr
