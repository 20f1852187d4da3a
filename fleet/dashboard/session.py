"""Who is looking at the dashboard: an API token, kept in a cookie after signing in.

Rules:
- Signing in takes an API token (the same tokens as the API's, so a person's role is the token's
  role) and stores it in the `fleet_session` cookie: `HttpOnly` (page scripts never see it),
  `SameSite=Strict` (other sites' requests do not carry it), `Secure` when the request came over
  HTTPS (directly or through a proxy that says so in `X-Forwarded-Proto`), `Path=/`, for
  `SESSION_S`. Every request looks the token up again, so revoking it signs the person out.
- The dashboard's scripts call the real API (`/api/v1`) with that cookie and the header
  `X-Fleet-Dashboard: 1`; the API accepts the cookie only with that header. A page on another
  site cannot send a custom header here (there is no CORS), so it cannot use the cookie
  (no cross-site request forgery). A form post (sign in, sign out) must come from this origin when
  the browser names one.
"""

from __future__ import annotations

from aiohttp import web

from fleet.db.models import ApiToken
from fleet.tokens import hash_token

COOKIE = "fleet_session"
HEADER = "X-Fleet-Dashboard"
SESSION_S = 12 * 3600


def api_bearer(request: web.Request) -> str | None:
    """The token an API request carries: `Authorization: Bearer`, or the dashboard's cookie
    with its header."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if request.headers.get(HEADER) == "1":
        return request.cookies.get(COOKIE) or None
    return None


async def token_row(token: str | None) -> ApiToken | None:
    """The token's row if it exists and is not revoked."""
    if not token:
        return None
    row = await ApiToken.get_or_none(token_hash=hash_token(token))
    return row if row is not None and row.revoked_at is None else None


async def signed_in(request: web.Request) -> ApiToken | None:
    return await token_row(request.cookies.get(COOKIE))


def same_origin(request: web.Request) -> bool:
    """Whether a form post came from this origin (or the browser did not say)."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    forwarded = request.headers.get("X-Forwarded-Host")
    host = forwarded or request.host
    return origin.split("://", 1)[-1] == host


def is_https(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def start_session(response: web.StreamResponse, request: web.Request, token: str) -> None:
    response.set_cookie(
        COOKIE, token, max_age=SESSION_S, path="/", httponly=True, samesite="Strict",
        secure=is_https(request),
    )  # fmt: skip


def end_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/")
