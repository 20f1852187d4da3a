"""The controller's side of telemetry without raw data.

`ingest` (verify, check, de-duplicate and store device reports), `consumer` (the MQTT consumer a
worker process runs), `aggregate` (fleet aggregates with their error bars, pure), `store`
(the queries behind the API), `metrics` (fleet-level Prometheus metrics), `retention`.
"""
