"""API tokens and roles.

Rules:
- A token is 256 random bits (`fleet_` + urlsafe base64). Only its SHA-256 is stored: with that
  much entropy a fast hash is enough, and a leaked database gives no usable token.
- Roles are ordered viewer < operator < admin; a route names the least role it needs.
"""

from __future__ import annotations

import hashlib
import secrets

ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "fleet_"  # noqa: S105 (a prefix, not a secret)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def role_allows(role: str, needed: str) -> bool:
    return role in ROLES and ROLES.index(role) >= ROLES.index(needed)
