"""Where handlers find the controller and the caller: an operator's token, or a device's
signature.

Rule: a request a device signs (`ota.request_auth`) is accepted only with the key of an enrolled
device (`Controller.device_key`); anything else is a 401 with no detail for the caller, and the
reason is counted (`fleet_device_requests_refused_total`) and logged.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from securesystemslib.signer import Key

from fleet.controller import Controller
from fleet.db.models import ApiToken
from fleet.logs import log
from ota.request_auth import DEVICE_HEADER, RequestAuthError, verify_request

CONTROLLER = web.AppKey("controller", Controller)
# Who made a request: the API token it carried, or the device that signed it.
REQUEST_TOKEN = web.RequestKey("token", ApiToken)
REQUEST_DEVICE = web.RequestKey("device", str)


def controller(request: web.Request) -> Controller:
    return request.app[CONTROLLER]


def caller(request: web.Request) -> ApiToken:
    token: ApiToken = request[REQUEST_TOKEN]
    return token


async def signing_device(request: web.Request) -> tuple[str, Key]:
    """The enrolled device that signed `request`, and its key; a 401 for anything else."""
    ctl = controller(request)
    device_id = request.headers.get(DEVICE_HEADER, "")
    key = await ctl.device_key(device_id) if device_id else None
    try:
        verify_request(request.headers, request.method, request.path_qs, time.time(), lambda _: key)
    except RequestAuthError as exc:
        ctl.metrics.device_requests_refused.labels(exc.kind).inc()
        log(
            "security.device_request_refused",
            logging.WARNING,
            reason=str(exc),
            path=request.path,
            peer=request.remote,
        )
        raise web.HTTPUnauthorized(
            text='{"error": "request not signed by a registered device"}',
            content_type="application/json",
        ) from None
    assert key is not None  # verify_request refuses a device without one
    request[REQUEST_DEVICE] = device_id  # the audit record's actor
    return device_id, key
