"""Telemetry's Prometheus metrics: counts of reports and fleet-level aggregates only.

Rule: no label or value is per device. Stream aggregates are fleet-wide means of noisy reports
(`fleet.telemetry.aggregate`), labelled by stream and key, which the rune's manifest bounds.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class TelemetryMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reports = Counter(
            "fleet_telemetry_reports_total",
            "Telemetry reports verified and stored",
            registry=registry,
        )
        self.duplicates = Counter(
            "fleet_telemetry_duplicates_total",
            "Telemetry reports seen again (same device and seq) and not stored again",
            registry=registry,
        )
        self.refused = Counter(
            "fleet_telemetry_refused_total",
            "Telemetry reports refused: bad signature, spoofed, expired, raw data, malformed",
            ["kind"],
            registry=registry,
        )
        self.inferences = Counter(
            "fleet_telemetry_inferences_total",
            "Inferences the fleet's devices reported running",
            registry=registry,
        )
        self.sandbox_errors = Counter(
            "fleet_telemetry_sandbox_errors_total",
            "Sandbox errors the fleet's devices reported, by kind",
            ["kind"],
            registry=registry,
        )
        self.stream_value = Gauge(
            "fleet_telemetry_stream_value",
            "A stream's fleet aggregate over the last hour (mean of the devices' noisy reports)",
            ["stream", "key"],
            registry=registry,
        )
        self.stream_error = Gauge(
            "fleet_telemetry_stream_error",
            "The 95% error bar of fleet_telemetry_stream_value from the devices' noise",
            ["stream", "key"],
            registry=registry,
        )
        self.stream_reports = Gauge(
            "fleet_telemetry_stream_reports",
            "Reports in a stream's fleet aggregate over the last hour",
            ["stream"],
            registry=registry,
        )
