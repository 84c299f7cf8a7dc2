"""Optional OpenTelemetry traces: one trace per request, spans from the router and every worker.

Off unless `router.otlp_traces_endpoint` (flag `--otlp-traces-endpoint`, the OTLP/HTTP traces URL,
e.g. http://127.0.0.1:4318/v1/traces) is set; the `opentelemetry` packages are an optional extra
(`pip install pdserve[otel]`), imported only then. Everything works without them.

The router opens the request's root span and sends its W3C `traceparent` in the Reserve, Prefill
and Generate messages; each process records its phases as child spans after the fact, from the
times it measured anyway (monotonic clock, turned into wall-clock time here):
  router:  request (root), router_queue
  prefill: prefill_queue, prefill, transfer
  decode:  decode (and prefill_queue, prefill for a prompt it ran itself)
"""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("pdserve.tracing")


def _wall_ns(mono: float) -> int:
    """A time.monotonic() reading as Unix nanoseconds."""
    return time.time_ns() - int((time.monotonic() - mono) * 1e9)


class Tracer:
    """The process's span recorder; every method is a no-op while tracing is off."""

    def __init__(self, endpoint: str, service: str, exporter: Any = None) -> None:
        self._provider: Any = None
        self._tracer: Any = None
        if not endpoint and exporter is None:
            return
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            log.warning("--otlp-traces-endpoint is set but opentelemetry is not installed "
                        "(pip install 'pdserve[otel]'): no traces")
            return
        self._propagator = TraceContextTextMapPropagator()
        # Not the global provider: each process (and each test) owns its own.
        self._provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint),
                                                                 schedule_delay_millis=500))
        else:
            self._provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("pdserve")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def start_request(self, request_id: str, start: float) -> Any:
        """The root span of a request at the router (end it with `end`); None when off."""
        if self._tracer is None:
            return None
        return self._tracer.start_span("request", start_time=_wall_ns(start),
                                       attributes={"pdserve.request_id": request_id})

    def traceparent(self, span: Any) -> str:
        """The W3C traceparent header value that makes other processes' spans children of `span`."""
        if span is None or self._tracer is None:
            return ""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier.get("traceparent", "")

    def end(self, span: Any, end: float, error: str = "") -> None:
        if span is None:
            return
        if error:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end_time=_wall_ns(end))

    def record(self, name: str, traceparent: str, start: float | None, end: float | None,
               **attributes: str | int | float | bool) -> None:
        """A finished span [start, end] (monotonic seconds) under the span `traceparent` names."""
        if self._tracer is None or not traceparent or start is None or end is None:
            return
        ctx = self._propagator.extract({"traceparent": traceparent})
        span = self._tracer.start_span(name, context=ctx, start_time=_wall_ns(start), attributes=attributes)
        span.end(end_time=_wall_ns(max(start, end)))

    def shutdown(self) -> None:
        """Send what is buffered (the process is stopping)."""
        if self._provider is not None:
            self._provider.shutdown()
