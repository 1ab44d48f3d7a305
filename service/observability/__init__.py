"""The observability room: structured logs, Prometheus metrics, OpenTelemetry tracing."""
