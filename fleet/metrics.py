"""The controller's Prometheus metrics, in a registry of its own (one per controller instance).

Rule: labels are low-cardinality (route templates, roles, reason tags); never a device id, a token
or anything derived from sensor data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fleet.rollout_metrics import RolloutMetrics


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "fleet_http_requests_total",
            "HTTP requests served, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.http_seconds = Histogram(
            "fleet_http_request_duration_seconds",
            "Time to serve an HTTP request",
            ["route"],
            registry=self.registry,
        )
        self.device_requests_refused = Counter(
            "fleet_device_requests_refused_total",
            "Device requests refused: unsigned, bad signature, unknown device, clock skew",
            ["reason"],
            registry=self.registry,
        )
        self.enrollment_refused = Counter(
            "fleet_enrollment_refused_total",
            "Enrollment and certificate renewal requests refused: bad signature, replay, bad CSR, "
            "bad token, rejected device",
            ["reason"],
            registry=self.registry,
        )
        self.runes_refused = Counter(
            "fleet_runes_refused_total",
            "Rune pushes refused: provenance (the org's admission policy) or invalid",
            ["kind"],
            registry=self.registry,
        )
        self.api_auth_refused = Counter(
            "fleet_api_auth_refused_total",
            "Operator API calls refused: no token, unknown token, role too low",
            ["reason"],
            registry=self.registry,
        )
        self.metadata_version = Gauge(
            "fleet_tuf_metadata_version",
            "Current version of each TUF role",
            ["role"],
            registry=self.registry,
        )
        self.metadata_expiry = Gauge(
            "fleet_tuf_metadata_expiry_timestamp_seconds",
            "When each TUF role's current signature expires (Unix time)",
            ["role"],
            registry=self.registry,
        )
        self.metadata_resigned = Counter(
            "fleet_tuf_resigned_total",
            "Metadata files published by the renewal schedule",
            ["role"],
            registry=self.registry,
        )
        self.runes_published = Gauge(
            "fleet_runes_published",
            "Rune versions currently published (not revoked)",
            registry=self.registry,
        )
        self.rollouts = RolloutMetrics(self.registry)
