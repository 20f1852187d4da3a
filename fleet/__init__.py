"""The controller: enrollment, rollouts, the command outbox, telemetry, metrics and `fleetctl`.

Uses `attestation` and `ota`; never imports `agent`.
"""
