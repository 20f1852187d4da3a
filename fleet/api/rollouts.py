"""`/api/v1/rollouts`: create, list, show and act on rollouts (the contract: docs/rollouts-api.md).

Rules: reading needs `viewer`, anything that changes a rollout `operator`. The work is
`fleet.rollout_service`; this module only maps HTTP to it, and its refusals to `ApiError`. After a
change the local scheduler is poked, so it picks the rollout up at once instead of at its next
refresh.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from fleet import rollout_service
from fleet.api.context import caller, controller
from fleet.api.errors import ApiError, json_response, read_json
from fleet.api.routes import API
from fleet.outbox import Outbox
from fleet.rollout_service import ACTIONS, RolloutRefused
from fleet.tuf_store import utcnow

STATES = ("scheduled", "running", "paused", "completed", "aborted", "rolled-back")


def _now(request: web.Request) -> datetime:
    outbox = controller(request).outbox
    return outbox.clock() if outbox is not None else utcnow()


def _outbox(request: web.Request) -> Outbox:
    outbox = controller(request).outbox
    if outbox is None:
        raise ApiError(503, "the controller has no broker link yet; try again in a moment")
    return outbox


def _poke(request: web.Request) -> None:
    scheduler = controller(request).scheduler
    if scheduler is not None:
        scheduler.poke()


async def _service(call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    try:
        return await call
    except RolloutRefused as exc:
        raise ApiError(exc.status, exc.message) from None


@API.add(
    "POST",
    "/api/v1/rollouts",
    "operator",
    "Create a rollout of a rune version to a selector, in waves (or plan one: dry_run)",
    request_body="application/json",
)
async def create_rollout(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    result = await _service(rollout_service.create(body, caller(request).name, _now(request)))
    if "id" not in result:  # a dry run
        return json_response(result)
    _poke(request)
    return json_response(result, status=201)


@API.add("GET", "/api/v1/rollouts", "viewer", "List rollouts, newest first", parameters=("state",))
async def list_rollouts(request: web.Request) -> web.StreamResponse:
    state = request.query.get("state")
    if state is not None and state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}")
    return json_response(await _service(rollout_service.list_rollouts(state, _now(request))))


@API.add("GET", "/api/v1/rollouts/{id}", "viewer", "Show a rollout: waves, counts, reasons, ETA")
async def show_rollout(request: web.Request) -> web.StreamResponse:
    rollout_id = request.match_info["id"]
    return json_response(await _service(rollout_service.show(rollout_id, _now(request))))


@API.add("GET", "/api/v1/rollouts/{id}/devices", "viewer", "A rollout's devices and their states")
async def rollout_devices(request: web.Request) -> web.StreamResponse:
    return json_response(await _service(rollout_service.device_list(request.match_info["id"])))


def _action(action: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        rollout_id = request.match_info["id"]
        result = await _service(
            rollout_service.act(
                rollout_id,
                action,
                _outbox(request),
                _now(request),
                controller(request).metrics.rollouts,
            )
        )
        _poke(request)
        return json_response(result)

    handler.__name__ = f"{action}_rollout"
    return handler


_SUMMARIES = {
    "pause": "Pause a scheduled or running rollout",
    "resume": "Resume a paused rollout, past the waves that tripped",
    "abort": "Abort a rollout: pending devices are cancelled, in-flight ones followed",
    "rollback": "Roll back: deploy the previous version to every device the rollout touched",
}
for _name in ACTIONS:
    API.add("POST", f"/api/v1/rollouts/{{id}}/{_name}", "operator", _SUMMARIES[_name])(
        _action(_name)
    )
