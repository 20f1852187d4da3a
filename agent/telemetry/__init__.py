"""Telemetry without raw data: what a device reports, what its owner lets it report, and how.

`consent` (the owner's opt-ins), `windows` (per-window aggregates of rune outputs), `noise`
(differential privacy with OpenDP), `budget` (the privacy budget per stream), `buffer` (signed
reports kept on disk until the broker has them), `reporter` (ties them to the daemon).
"""
