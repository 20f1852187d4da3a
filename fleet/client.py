"""`fleetctl`'s HTTP client for the controller API.

Rules: an API error becomes `ApiClientError` carrying the controller's one-line message and the
status; an unreachable controller is `ControllerUnreachable` naming the URL. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any
from urllib.parse import urlencode

import urllib3

DEFAULT_SERVER = "http://127.0.0.1:8470"


class ApiClientError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ControllerUnreachable(Exception):
    pass


class ApiClient:
    def __init__(self, server: str, token: str | None, timeout: float = 60.0) -> None:
        self.server = server.rstrip("/")
        self.token = token
        self._http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=timeout), retries=False
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        body: bytes | None = None,
        params: dict[str, str | None] | None = None,
        content_type: str = "application/octet-stream",
        raw: bool = False,
    ) -> Any:
        headers: dict[str, str] = {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        if body is not None:
            headers["Content-Type"] = content_type
        query = {k: v for k, v in (params or {}).items() if v is not None}
        url = f"{self.server}{path}" + (f"?{urlencode(query)}" if query else "")
        try:
            response = self._http.request(method, url, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ControllerUnreachable(
                f"cannot reach the controller at {self.server} ({reason}); is `fleetctl serve` "
                "running, and is --server / FLEET_SERVER right?"
            ) from None
        text = response.data
        if response.status >= 400:
            message = f"HTTP {response.status}"
            with contextlib.suppress(ValueError, KeyError, TypeError):
                message = str(json.loads(text)["error"])
            raise ApiClientError(response.status, message)
        if not raw and response.headers.get("Content-Type", "").startswith("application/json"):
            return json.loads(text)
        return text
