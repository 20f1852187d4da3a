"""API errors: one JSON line `{"error": "..."}` and an HTTP status that means something."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from aiohttp import web

from fleet.rollout_plan import PlanError, parse_duration


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise ApiError(400, "the request body is not JSON") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def duration_query(request: web.Request, name: str, default: str | None) -> timedelta | None:
    """The query parameter `name` as a duration (`90s`, `30m`, `1h`, `7d`), or `default`'s when
    it is absent (None: no default); a 400 naming it when it is not a duration."""
    text = request.query.get(name, default)
    if text is None:
        return None
    try:
        return timedelta(seconds=parse_duration(text, name))
    except PlanError as exc:
        raise ApiError(400, str(exc)) from None
