"""`/api/v1/telemetry`: the fleet's telemetry streams and their aggregates, read-only.

Rules: viewers read. There is no route that takes telemetry in: reports arrive signed over MQTT
only (`fleet.telemetry.ingest`), and there is no route for one device's stream values, only for
aggregates (`fleet.telemetry.store`). `since` is a duration (`1h`, `30m`, `7d`; default 1 h);
`rune` is `NAME@VERSION` in `org` (default `default`) or `ORG/NAME@VERSION`; `label` repeats
as `k=v`; an unknown rollout is a 404, anything malformed a 400 naming it.
"""

from __future__ import annotations

from datetime import timedelta

from aiohttp import web

from fleet.api.errors import ApiError, duration_query, json_response
from fleet.api.routes import API
from fleet.enrollment import parse_label_selector
from fleet.telemetry.store import TelemetryQueryError, list_streams, stream_aggregate
from fleet.tuf_store import utcnow
from ota.targets import DEFAULT_ORG, TargetNameError, check_part, parse_rune_ref


def _since(request: web.Request) -> timedelta:
    since = duration_query(request, "since", "1h")
    assert since is not None  # it has a default
    return since


def _rune(text: str | None, org: str) -> str | None:
    if not text:
        return None
    if "/" in text:
        org, _, text = text.partition("/")
    try:
        name, version = parse_rune_ref(text)
        check_part("org", org)
    except TargetNameError as exc:
        raise ApiError(400, str(exc)) from None
    return f"{org}/{name}@{version}"


@API.add(
    "GET",
    "/api/v1/telemetry/streams",
    "viewer",
    "The telemetry streams devices reported since a time, with report and device counts",
    parameters=("since",),
)
async def streams(request: web.Request) -> web.StreamResponse:
    since = utcnow() - _since(request)
    return json_response({"since": since.timestamp(), "streams": await list_streams(since)})


@API.add(
    "GET",
    "/api/v1/telemetry/streams/{rune}/{stream}",
    "viewer",
    "A stream's fleet aggregate with its error bar, for a rune version, labels or a rollout "
    "(then per wave too)",
    parameters=("since", "rune", "org", "label", "rollout"),
)
async def stream(request: web.Request) -> web.StreamResponse:
    stream_id = f"{request.match_info['rune']}/{request.match_info['stream']}"
    since = utcnow() - _since(request)
    org = request.query.get("org", DEFAULT_ORG)
    try:
        labels = parse_label_selector(request.query.getall("label", []))
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    try:
        answer = await stream_aggregate(
            stream_id,
            since,
            rune=_rune(request.query.get("rune"), org),
            labels=labels or None,
            rollout=request.query.get("rollout") or None,
        )
    except TelemetryQueryError as exc:
        raise ApiError(404, str(exc)) from None
    return json_response(answer)
