"""Rollout metrics for Prometheus: what the rollouts decided, and where the running ones stand.

Rules:
- Counters count decisions once they are stored (`rollout_service.persist` calls `record` after
  its transaction committed), whoever made them: the scheduler, or an operator's action.
- The gauges describe the rollouts the scheduler of this replica drives; a replica that does not
  hold the scheduler lock reports zeros (and `fleet_rollout_scheduler_leading 0`), so summing a
  gauge over the replicas gives the fleet's figure.
- Labels are states, reasons from a closed set and attempt kinds: never a rollout or device id.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge

from fleet.rollouts import (
    Decision,
    DeviceState,
    DeviceTimedOut,
    Notify,
    RollbackTimedOut,
    Rollout,
    RolloutChanged,
    RolloutState,
    SendRollback,
    Skip,
    WaveStarted,
)

ACTIVE_STATES = (RolloutState.SCHEDULED, RolloutState.RUNNING, RolloutState.PAUSED)


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.notifications = Counter(
            "fleet_rollout_notifications_total",
            "Deploy commands rollouts sent to devices, first attempts and retries",
            ["attempt"],
            registry=registry,
        )
        self.skipped = Counter(
            "fleet_rollout_devices_skipped_total",
            "Devices a rollout skipped: offline, quarantined, ineligible, cancelled",
            ["reason"],
            registry=registry,
        )
        self.timeouts = Counter(
            "fleet_rollout_device_timeouts_total",
            "Devices that gave no result before their deadline (retried or timed out)",
            ["retried"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "fleet_rollout_rollbacks_total",
            "Rollback commands rollouts sent, and rollbacks that timed out",
            ["event"],
            registry=registry,
        )
        self.waves_started = Counter(
            "fleet_rollout_waves_started_total",
            "Waves started",
            registry=registry,
        )
        self.transitions = Counter(
            "fleet_rollout_transitions_total",
            "Rollouts entering a state (running, paused, completed, aborted, rolled-back)",
            ["state"],
            registry=registry,
        )
        self.rollouts = Gauge(
            "fleet_rollouts",
            "Unfinished rollouts this replica's scheduler drives, by state",
            ["state"],
            registry=registry,
        )
        self.devices = Gauge(
            "fleet_rollout_devices",
            "Devices of the unfinished rollouts this replica's scheduler drives, by device state",
            ["state"],
            registry=registry,
        )
        self.leading = Gauge(
            "fleet_rollout_scheduler_leading",
            "1 while this replica holds the scheduler lock and drives the rollouts",
            registry=registry,
        )
        for state in ACTIVE_STATES:
            self.rollouts.labels(state.value)
        for device_state in DeviceState:
            self.devices.labels(device_state.value)

    def record(self, decisions: Sequence[Decision]) -> None:
        """Count stored decisions."""
        for decision in decisions:
            if isinstance(decision, Notify):
                self.notifications.labels("first" if decision.attempt == 1 else "retry").inc()
            elif isinstance(decision, Skip):
                self.skipped.labels(decision.reason.value).inc()
            elif isinstance(decision, DeviceTimedOut):
                self.timeouts.labels("yes" if decision.retry else "no").inc()
            elif isinstance(decision, SendRollback):
                self.rollbacks.labels("sent").inc()
            elif isinstance(decision, RollbackTimedOut):
                self.rollbacks.labels("timed-out").inc()
            elif isinstance(decision, WaveStarted):
                self.waves_started.inc()
            elif isinstance(decision, RolloutChanged):
                self.transitions.labels(decision.state.value).inc()

    def observe(self, leading: bool, machines: Iterable[Rollout]) -> None:
        """Set the gauges from the rollouts in the scheduler's hands."""
        self.leading.set(1 if leading else 0)
        states: Tally[str] = Tally()
        devices: Tally[str] = Tally()
        for machine in machines:
            if machine.state in ACTIVE_STATES:
                states[machine.state.value] += 1
                devices.update(target.state.value for target in machine.targets.values())
        for state in ACTIVE_STATES:
            self.rollouts.labels(state.value).set(states[state.value])
        for device_state in DeviceState:
            self.devices.labels(device_state.value).set(devices[device_state.value])
