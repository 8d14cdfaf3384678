"""OpenTelemetry SDK set-up from the standard `OTEL_*` variables, for the CLI and the example.

The library itself never sets global providers; this builds providers to inject.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

__all__ = ["configure_from_environment"]

logger = logging.getLogger("asgi_gateway")

_DEFAULT_SERVICE_NAME = "asgi-gateway"


def _exporters(variable: str) -> set[str]:
    value = os.environ.get(variable, "otlp")
    return {name.strip().lower() for name in value.split(",") if name.strip()}


def _has_endpoint(signal: str) -> bool:
    generic = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return bool(generic or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"))


def _otlp_exporter(signal: str) -> Any:
    """An OTLP exporter for `signal` ("TRACES" or "METRICS"), or None when the extra is missing."""
    protocol = (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    module, name = (
        ("trace_exporter", "OTLPSpanExporter")
        if signal == "TRACES"
        else ("metric_exporter", "OTLPMetricExporter")
    )
    if protocol == "grpc":
        try:
            return getattr(
                importlib.import_module(f"opentelemetry.exporter.otlp.proto.grpc.{module}"), name
            )()
        except ImportError:
            logger.warning(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; "
                "exporting over OTLP/HTTP instead"
            )
    try:
        exporter_class = getattr(
            importlib.import_module(f"opentelemetry.exporter.otlp.proto.http.{module}"), name
        )
    except ImportError:
        logger.warning(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the OTLP exporter is not installed: "
            "pip install 'asgi-gateway[otlp]'"
        )
        return None
    return exporter_class()


def configure_from_environment() -> dict[str, Any]:
    """Tracer and meter providers configured by the standard `OTEL_*` variables.

    Returns keyword arguments for `Gateway`/`GatewayMiddleware`: empty (tracing off,
    no cost) when `OTEL_SDK_DISABLED` is true or nothing is to be exported. Traces
    and metrics go over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the
    per-signal `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`) is set, unless
    `OTEL_TRACES_EXPORTER` / `OTEL_METRICS_EXPORTER` say `none` (Jaeger takes
    traces only: set `OTEL_METRICS_EXPORTER=none` there) or `console`. The
    service name comes from `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES`
    (default "asgi-gateway"), the sampler from `OTEL_TRACES_SAMPLER`.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return {}
    traces = _exporters("OTEL_TRACES_EXPORTER")
    metrics = _exporters("OTEL_METRICS_EXPORTER")
    want_otlp_traces = "otlp" in traces and _has_endpoint("TRACES")
    want_otlp_metrics = "otlp" in metrics and _has_endpoint("METRICS")
    if not (want_otlp_traces or want_otlp_metrics or "console" in traces or "console" in metrics):
        return {}

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: _DEFAULT_SERVICE_NAME}))

    providers: dict[str, Any] = {}
    span_exporters: list[Any] = []
    metric_exporters: list[Any] = []
    if want_otlp_traces and (exporter := _otlp_exporter("TRACES")) is not None:
        span_exporters.append(exporter)
    if want_otlp_metrics and (exporter := _otlp_exporter("METRICS")) is not None:
        metric_exporters.append(exporter)
    if "console" in traces:
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        span_exporters.append(ConsoleSpanExporter())
    if "console" in metrics:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        metric_exporters.append(ConsoleMetricExporter())

    if span_exporters:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=resource)
        for span_exporter in span_exporters:
            tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        providers["tracer_provider"] = tracer_provider
    if metric_exporters:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers = [PeriodicExportingMetricReader(metric_exporter) for metric_exporter in metric_exporters]
        providers["meter_provider"] = MeterProvider(resource=resource, metric_readers=readers)
    return providers
