"""A malicious mirror for the attack suite: an HTTP proxy in front of a real controller.

`Mirror(upstream).start()` listens on 127.0.0.1 (a free port) in a thread; a device uses its
`url` as `--server`. Every GET is forwarded to the controller with the device's headers (the
`Fleet-*` request signature and attestation, `Range`, `Accept-Encoding`) and the answer is
relayed (status, `Content-Type`, `Content-Range`, body), unless the test told the mirror to
misbehave for that URL path (`/tuf/...`, without the query):

- `replace[path] = data`: answer 200 with `data` instead; the controller is not asked. This is
  how a test flips bytes in a target, serves the (valid, signed) bytes of another target, serves
  metadata signed by the attacker's own keys, or serves a file the controller does not have
  (`3.root.json`).
- `replay(path, index)`: serve a body recorded earlier for `path` (every 200 body relayed from
  the controller is kept in `recorded[path]`, oldest first): an old `timestamp.json`, an old
  `N.snapshot.json`.
- `endless.add(path)`: answer 200 with a body of zeros that never ends (no `Content-Length`) until
  the client hangs up (or `ENDLESS_CAP` bytes).

A POST (the device attesting) is passed to the controller as it is, like a CDN passes what it
does not cache to its origin.

`exchanges` logs every request (path, `Range`, status, body bytes actually written to the client);
`sent(path)` totals the bytes a path cost, which is how a test sees that a download was resumed
rather than restarted. Responses are HTTP/1.0 (one request per connection), so a body that is cut
or endless ends when the connection does.
"""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from tests.background_http import BackgroundHTTPServer

ENDLESS_CAP = 1024 * 1024 * 1024
CHUNK = 64 * 1024
_FORWARDED_REQUEST = (
    "fleet-device",
    "fleet-date",
    "fleet-signature",
    "fleet-attestation",
    "range",
    "accept-encoding",
    "content-type",
)
_RELAYED_RESPONSE = ("Content-Type", "Content-Range", "Cache-Control")


def target_url_path(target: str, sha256: str) -> str:
    """The consistent-snapshot URL path of target `runes/ORG/NAME/VERSION` with this content."""
    directory, _, basename = target.rpartition("/")
    return f"/tuf/targets/{directory}/{sha256}.{basename}"


def metadata_path(filename: str) -> str:
    return f"/tuf/metadata/{filename}"


@dataclass
class Exchange:
    path: str
    range: str | None
    status: int = 0
    sent: int = 0
    forwarded: bool = True


@dataclass
class Mirror(BackgroundHTTPServer):
    upstream: str
    replace: dict[str, bytes] = field(default_factory=dict)
    endless: set[str] = field(default_factory=set)
    recorded: dict[str, list[bytes]] = field(default_factory=dict)
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._serve(_handler_for(self))
        parts = urlsplit(self.upstream)
        self._upstream_host = parts.hostname or "127.0.0.1"
        self._upstream_port = parts.port or 80

    # Misbehaviour.

    def replay(self, path: str, index: int = 0) -> bytes:
        """Serve the body recorded for `path` at `index` (0: the oldest) from now on."""
        body = self.recorded[path][index]
        self.replace[path] = body
        return body

    def behave(self) -> None:
        """Forward everything again."""
        self.replace.clear()
        self.endless.clear()

    # Inspection.

    def last(self, path: str) -> bytes:
        """The newest body the controller sent for `path`."""
        return self.recorded[path][-1]

    def exchanges_for(self, path: str) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if e.path == path]

    def sent(self, path: str) -> int:
        return sum(e.sent for e in self.exchanges_for(path))

    # Serving.

    def _forward(
        self, target: str, headers: dict[str, str], method: str = "GET", body: bytes | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(
            self._upstream_host, self._upstream_port, timeout=30
        )
        try:
            connection.request(method, target, body=body, headers=headers)
            response = connection.getresponse()
            body = response.read()
            relayed = {k: v for k in _RELAYED_RESPONSE if (v := response.getheader(k)) is not None}
            return response.status, relayed, body
        finally:
            connection.close()


def _handler_for(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            exchange = Exchange(path, self.headers.get("Range"))
            with mirror._lock:
                mirror.exchanges.append(exchange)
                replaced = mirror.replace.get(path)
                endless = path in mirror.endless
            if endless:
                exchange.forwarded = False
                self._endless(exchange)
                return
            if replaced is not None:
                exchange.forwarded = False
                self._answer(exchange, 200, {"Content-Type": "application/octet-stream"}, replaced)
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED_REQUEST}
            try:
                status, relayed, body = mirror._forward(self.path, headers)
            except OSError:
                self._answer(exchange, 502, {}, b"")
                return
            if status == 200:
                with mirror._lock:
                    mirror.recorded.setdefault(path, []).append(body)
            self._answer(exchange, status, relayed, body)

        def do_POST(self) -> None:
            exchange = Exchange(self.path.split("?", 1)[0], None)
            with mirror._lock:
                mirror.exchanges.append(exchange)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() in _FORWARDED_REQUEST}
            try:
                status, relayed, answer = mirror._forward(self.path, headers, "POST", body)
            except OSError:
                self._answer(exchange, 502, {}, b"")
                return
            self._answer(exchange, status, relayed, answer)

        def _answer(
            self, exchange: Exchange, status: int, headers: dict[str, str], body: bytes
        ) -> None:
            exchange.status = status
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for start in range(0, len(body), CHUNK):
                    self.wfile.write(body[start : start + CHUNK])
                    exchange.sent += min(CHUNK, len(body) - start)
            except OSError:
                pass  # the client hung up (or was killed) mid-body

        def _endless(self, exchange: Exchange) -> None:
            exchange.status = 200
            chunk = b"\0" * CHUNK
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                while exchange.sent < ENDLESS_CAP and not mirror._stopping.is_set():
                    self.wfile.write(chunk)
                    exchange.sent += len(chunk)
            except OSError:
                pass
            self.close_connection = True

    return Handler
