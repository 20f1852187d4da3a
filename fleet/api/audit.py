"""`/api/v1/audit`, and the middleware that records API calls in the audit log.

Rules:
- Every `/api/v1` call that could change something (POST, PUT, PATCH, DELETE), whatever its
  outcome, and every call refused for its credentials (401, 403), whatever its method, is a
  record: who (`NAME (role)` for an API token, `device:ID` for a device's verified signature,
  `unverified:ID` for a device header whose signature was refused, else `anonymous`), what
  (`METHOD /route/{template}`), the path it named, the outcome (`ok` for 2xx and 3xx, `refused`
  for 401 and 403, `rejected` for other 4xx, `failed` for 5xx) and the status, the peer, and the
  error message for a call that failed. Never a request body or a token.
- Operators read the log and check its chain; viewers do neither (the log names every caller).
- `since` is a duration (`1h`, `7d`; default: no limit), `action` a prefix (`POST /api/v1/rollouts`,
  `security.`), `limit` at most `MAX_LIMIT` (default 100, the newest), `after` a seq to page
  forward from.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from fleet.api.context import REQUEST_DEVICE, REQUEST_TOKEN, controller
from fleet.api.errors import ApiError, duration_query, json_response
from fleet.api.routes import API, Handler
from fleet.audit import Entry
from fleet.audit_log import check_stored_chain, read_records
from fleet.tuf_store import utcnow
from ota.request_auth import DEVICE_HEADER

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_LIMIT = 5_000


def outcome_of(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (401, 403):
        return "refused"
    return "rejected" if status < 500 else "failed"


def _actor(request: web.Request) -> str:
    token = request.get(REQUEST_TOKEN)
    if token is not None:
        return f"{token.name} ({token.role})"
    device = request.get(REQUEST_DEVICE)
    if device is not None:
        return f"device:{device}"
    claimed = request.headers.get(DEVICE_HEADER)
    return f"unverified:{claimed[:64]}" if claimed else "anonymous"


def _error(response: web.StreamResponse | None) -> str | None:
    if not isinstance(response, web.Response) or response.status < 400:
        return None
    body = response.body
    if not isinstance(body, bytes):
        return None
    try:
        message = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return message if isinstance(message, str) else None


@web.middleware
async def audit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    audit = controller(request).audit
    if audit is None or not request.path.startswith("/api/v1/"):
        return await handler(request)
    status, response = 500, None
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        if request.method in MUTATING or status in (401, 403):
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else request.path
            details: dict[str, object] = {"status": status, "peer": request.remote or "-"}
            if request.query_string:
                details["query"] = request.query_string
            error = _error(response)
            if error is not None:
                details["error"] = error
            audit.record(
                Entry(
                    utcnow(),
                    _actor(request),
                    f"{request.method} {route}",
                    request.path,
                    outcome_of(status),
                    details,
                )
            )


def _int(request: web.Request, name: str, default: int, most: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 0 <= int(text) <= most:
        raise ApiError(400, f"{name} must be a whole number from 0 to {most}")
    return int(text)


@API.add(
    "GET",
    "/api/v1/audit",
    "operator",
    "Audit records, oldest first: API calls that change something or were refused, and security "
    "events",
    parameters=("since", "action", "actor", "limit", "after"),
)
async def list_audit(request: web.Request) -> web.StreamResponse:
    ago = duration_query(request, "since", None)
    since = None if ago is None else utcnow() - ago
    records = await read_records(
        since=since,
        after_seq=_int(request, "after", 0, 2**62),
        action=request.query.get("action") or None,
        actor=request.query.get("actor") or None,
        limit=_int(request, "limit", 100, MAX_LIMIT) or 100,
    )
    return json_response({"records": [r.to_json() for r in records]})


@API.add(
    "GET",
    "/api/v1/audit/verify",
    "operator",
    "Check the audit log's hash chain: every edited, deleted or re-ordered record",
)
async def verify_audit(request: web.Request) -> web.StreamResponse:
    audit = controller(request).audit
    if audit is None:
        raise ApiError(503, "this controller keeps no audit log")
    check = await check_stored_chain(audit.key, audit.highest_seq)
    return json_response(
        {
            "intact": check.intact,
            "records": check.records,
            "head": {"seq": check.head_seq, "hash": check.head_hash},
            "breaks": [{"seq": b.seq, "problem": b.problem} for b in check.breaks],
            "dropped": audit.dropped,
        }
    )
