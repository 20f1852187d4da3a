"""Where handlers find the controller and the caller."""

from __future__ import annotations

from aiohttp import web

from fleet.controller import Controller
from fleet.db.models import ApiToken

CONTROLLER = web.AppKey("controller", Controller)


def controller(request: web.Request) -> Controller:
    return request.app[CONTROLLER]


def caller(request: web.Request) -> ApiToken:
    token: ApiToken = request["token"]
    return token
