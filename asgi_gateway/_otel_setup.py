"""OpenTelemetry SDK set-up from the standard `OTEL_*` variables, for the CLI and the example.

The library itself never sets global providers; this builds providers to inject.
"""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["configure_from_environment"]

logger = logging.getLogger("asgi_gateway")


def configure_from_environment() -> dict[str, Any]:
    """Tracer and meter providers exporting over OTLP/HTTP, when an endpoint is configured.

    Returns keyword arguments for `Gateway`/`GatewayMiddleware`: empty when
    `OTEL_SDK_DISABLED` is true or no `OTEL_EXPORTER_OTLP_*ENDPOINT` is set.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return {}
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        return {}
    try:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        logger.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but the 'otlp' extra is not installed")
        return {}
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "asgi-gateway")}).merge(
        OTELResourceDetector().detect()
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    meter_provider = MeterProvider(
        resource=resource, metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())]
    )
    return {"tracer_provider": tracer_provider, "meter_provider": meter_provider}
