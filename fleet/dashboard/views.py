"""The dashboard's pages: overview, devices, rollouts, runes, telemetry, audit log, sign-in.

Rules:
- Every page needs a signed-in token (`fleet.dashboard.session`); without one it redirects to
  `/login`. What a page shows and offers follows the token's role: everyone sees the fleet;
  operators and admins also get the rollout buttons (pause, resume, abort, rollback), which call
  the API, so the API's own role check and audit record apply; the audit log page needs an
  operator, like its API.
- Pages are drawn on the server from the same services the API uses. A page asked for with
  `X-Fleet-Fragment: main` returns only its `<main>`, which the page's script fetches every
  `REFRESH_MS` to stay live without reloading (and stops asking for while the tab is hidden).
- Every response carries a content security policy that allows nothing from outside the
  controller and no inline script or style; pictures are inline SVG (`fleet.dashboard.charts`).
- Lists are bounded: devices come `PAGE` at a time, the audit log's newest `AUDIT_ROWS`.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from jinja2 import Environment, PackageLoader, select_autoescape

from fleet.api.access import device_json
from fleet.api.context import controller
from fleet.audit import Entry
from fleet.audit_log import read_records
from fleet.dashboard.charts import Point, breakdown, series, wave_progress
from fleet.dashboard.session import end_session, same_origin, signed_in, start_session, token_row
from fleet.db import sql
from fleet.db.models import ApiToken, Command, Device, Rune
from fleet.enrollment import parse_label_selector
from fleet.logs import log
from fleet.overview import ATTESTATION_STATUSES, fleet_overview
from fleet.rollout_service import ACTIONS, RolloutRefused, list_rollouts, show
from fleet.telemetry.store import list_streams, stream_aggregate, stream_series
from fleet.tokens import role_allows
from fleet.tuf_store import utcnow

REFRESH_MS = 3000
PAGE = 100
AUDIT_ROWS = 200
TELEMETRY_WINDOW = timedelta(hours=6)
TELEMETRY_BUCKETS = 12
FRAGMENT_HEADER = "X-Fleet-Fragment"
STATIC = Path(__file__).parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# The buttons a rollout page offers in each state (the API decides in the end).
OFFERED = {
    "scheduled": ("pause", "abort"),
    "running": ("pause", "abort", "rollback"),
    "paused": ("resume", "abort", "rollback"),
    "completed": ("rollback",),
    "aborted": ("rollback",),
}
CONFIRM = {
    "abort": "Abort this rollout? Devices not yet notified are cancelled.",
    "rollback": "Roll back every device this rollout touched to its previous version?",
}

_templates = Environment(
    loader=PackageLoader("fleet.dashboard", "templates"),
    autoescape=select_autoescape(default=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.globals.update(breakdown=breakdown, wave_progress=wave_progress)


def _render(
    request: web.Request, template: str, user: ApiToken | None, status: int = 200, **data: Any
) -> web.Response:
    fragment = request.headers.get(FRAGMENT_HEADER) == "main"
    page = _templates.get_template(template).render(
        fragment=fragment,
        user=user,
        can_act=user is not None and role_allows(user.role, "operator"),
        path=request.path,
        refresh=REFRESH_MS,
        **data,
    )
    return web.Response(text=page, status=status, content_type="text/html")


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    """The dashboard's headers, on every response outside the API and the TUF repository."""
    if request.path.startswith(("/api/", "/tuf/")):
        return
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Cache-Control"] = "no-store"


async def _user(request: web.Request) -> ApiToken:
    user = await signed_in(request)
    if user is None:
        if request.headers.get(FRAGMENT_HEADER):
            raise web.HTTPUnauthorized(text="sign in again")
        raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
    return user


# -- signing in ------------------------------------------------------------------------------------


def _next(value: str | None) -> str:
    """Where to go after signing in: a path on this controller only (browsers read `//x` and
    `/\\x` as another host), else the overview."""
    safe = (
        value is not None
        and value.startswith("/")
        and not value.startswith(("//", "/\\"))
        and value.isprintable()
    )
    return value if safe and value is not None else "/"


async def login_page(request: web.Request) -> web.StreamResponse:
    return _render(request, "login.html", None, next=_next(request.query.get("next")), error=None)


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    target = _next(str(form.get("next", "/")))
    if not same_origin(request):
        return _render(request, "login.html", None, 403, next=target, error="refused: another site")
    token = str(form.get("token", "")).strip()
    row = await token_row(token)
    if row is None:
        log("security.dashboard_sign_in_refused", peer=request.remote or "-")
        error = "unknown or revoked token"
        return _render(request, "login.html", None, 401, next=target, error=error)
    audit = controller(request).audit
    if audit is not None:
        who, peer = f"{row.name} ({row.role})", {"peer": request.remote or "-"}
        audit.record(Entry(utcnow(), who, "dashboard.sign_in", "/login", "ok", peer))
    response = web.HTTPSeeOther(target)
    start_session(response, request, token)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login")
    if same_origin(request):
        end_session(response)
    raise response


# -- pages -----------------------------------------------------------------------------------------


async def overview(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    data = await fleet_overview(utcnow())
    devices = data["devices"]
    attestation = [(status, devices["attestation"][status]) for status in ATTESTATION_STATUSES]
    states = [(state, count) for state, count in devices["by_state"].items()]
    return _render(
        request, "overview.html", user, overview=data, attestation=attestation, states=states
    )


async def devices(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    error = None
    try:
        selector = parse_label_selector(request.query.getall("label", []))
    except ValueError as exc:
        selector, error = {}, str(exc)  # shown on the page; the list is then unfiltered
    state = request.query.get("state") or None
    rune = request.query.get("rune") or None
    offset_text = request.query.get("offset", "0")
    offset = int(offset_text) if offset_text.isdigit() else 0
    query = Device.all()
    if state:
        query = query.filter(state=state)
    if rune:
        query = query.filter(active_rune__icontains=rune)
    columns = ("id", "state", "labels", "online", "active_rune", "attestation_status",
               "attestation_expires_at", "quarantined_at", "last_seen_at")  # fmt: skip
    if selector:  # labels are JSON: matched here, the same way on every database
        rows = await query.order_by("id").values(*columns)
        matching = [
            row for row in rows
            if all((row["labels"] or {}).get(k) == v for k, v in selector.items())
        ]  # fmt: skip
        total, shown = len(matching), matching[offset : offset + PAGE]
    else:
        total = await query.count()
        shown = await query.order_by("id").offset(offset).limit(PAGE).values(*columns)
    now = utcnow()
    for row in shown:
        expires = row["attestation_expires_at"]
        status = row["attestation_status"] or "none"
        row["attestation"] = "expired" if expires is not None and expires < now else status
    return _render(
        request, "devices.html", user, 400 if error else 200, error=error,
        devices=shown, total=total, offset=offset, page=PAGE,
        filters={"label": request.query.getall("label", []), "state": state or "",
                 "rune": rune or ""},
        more=urlencode([("label", k) for k in request.query.getall("label", [])]
                       + [("state", state or ""), ("rune", rune or "")]),
    )  # fmt: skip


async def device(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    device_id = request.match_info["id"]
    row = await Device.get_or_none(id=device_id)
    if row is None:
        return _render(request, "missing.html", user, 404, what=f"device {device_id}")
    history = await Command.filter(device_id=row.id).order_by("-created_at").limit(20)
    events = await read_records(actor=f"device:{row.id}", limit=20)
    return _render(
        request, "device.html", user, device=device_json(row, detail=True), history=history,
        events=[e.to_json() for e in reversed(events)],
    )  # fmt: skip


async def rollouts(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    listed = await list_rollouts(None, utcnow())
    return _render(request, "rollouts.html", user, rollouts=listed["rollouts"])


async def rollout(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    rollout_id = request.match_info["id"]
    try:
        shown = await show(rollout_id, utcnow())
    except RolloutRefused:
        return _render(request, "missing.html", user, 404, what=f"rollout {rollout_id}")
    return _render(
        request, "rollout.html", user, rollout=shown, streams=await _rollout_streams(shown),
        actions=[a for a in ACTIONS if a in OFFERED.get(shown["state"], ())], confirm=CONFIRM,
    )  # fmt: skip


async def _rollout_streams(shown: dict[str, Any]) -> list[dict[str, Any]]:
    """Each telemetry stream the rollout's rune reported since it started, per wave."""
    if shown["started_at"] is None:
        return []
    since = utcnow() - timedelta(days=30)
    answers = []
    for entry in await list_streams(since):
        if shown["rune"] in entry["runes"]:
            answers.append(await stream_aggregate(entry["stream"], since, rollout=shown["id"]))
    return answers


async def runes(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    rows = await Rune.all().order_by("org", "name", "-created_at")
    running: dict[str, int] = {}
    for count in await sql.fetch(
        "SELECT active_rune, COUNT(*) AS n FROM device WHERE state = 'enrolled' "
        "AND active_rune IS NOT NULL GROUP BY active_rune",
        [],
    ):
        running[str(count["active_rune"])] = int(count["n"])
    listed = [
        {
            "ref": f"{r.org}/{r.name}@{r.version}", "kind": r.kind, "size": r.size,
            "sha256": r.sha256, "pushed_by": r.pushed_by, "created_at": r.created_at,
            "revoked": r.revoked_at is not None, "provenance": r.provenance,
            "signer": r.provenance_signer, "capabilities": r.capabilities,
            "devices": running.get(f"{r.org}/{r.name}@{r.version}", 0),
        }
        for r in rows
    ]  # fmt: skip
    return _render(request, "runes.html", user, runes=listed)


async def telemetry(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    until = utcnow()
    since = until - TELEMETRY_WINDOW
    charts = []
    for entry in await list_streams(since):
        periods = await stream_series(entry["stream"], since, until, TELEMETRY_BUCKETS)
        keys: list[str] = []
        for period in periods:
            if period["aggregate"]["value"] is not None:
                keys = period["aggregate"]["keys"]
        pictures = []
        for index, key in enumerate(keys[:8]):
            points = [
                Point(p["until"], p["aggregate"]["value"][index], p["aggregate"]["error"][index])
                for p in periods
                if p["aggregate"]["value"] is not None and p["aggregate"]["keys"] == keys
            ]
            picture = series(
                points, f"{entry['stream']} {key}", (since.timestamp(), until.timestamp()),
                (f"{TELEMETRY_WINDOW.total_seconds() / 3600:g} h ago", "now"),
            )  # fmt: skip
            pictures.append((key, picture))
        charts.append({"stream": entry, "pictures": pictures})
    return _render(request, "telemetry.html", user, charts=charts, hours=6)


async def audit(request: web.Request) -> web.StreamResponse:
    user = await _user(request)
    if not role_allows(user.role, "operator"):
        return _render(request, "audit.html", user, 403, records=None)
    action = request.query.get("action") or None
    records = await read_records(action=action, limit=AUDIT_ROWS)
    return _render(
        request, "audit.html", user, records=[r.to_json() for r in reversed(records)],
        action=action or "",
    )  # fmt: skip


def install(app: web.Application) -> None:
    app.router.add_get("/", overview)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/devices", devices)
    app.router.add_get("/devices/{id}", device)
    app.router.add_get("/rollouts", rollouts)
    app.router.add_get("/rollouts/{id}", rollout)
    app.router.add_get("/runes", runes)
    app.router.add_get("/telemetry", telemetry)
    app.router.add_get("/audit", audit)
    app.router.add_static("/static/", STATIC, append_version=False)
    app.on_response_prepare.append(_secure)
