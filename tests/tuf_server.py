"""A real HTTP update server for tests: the controller's TUF layout, signed requests, misbehaviour.

`TufServer` serves `/tuf/metadata/{filename}` from `metadata` and `/tuf/targets/{dir}/{sha256}.
{basename}` from `targets` on 127.0.0.1 (a free port), in a thread. Every request must carry an
`ota.request_auth` signature from a device in `devices` (401 otherwise). `Range: bytes=N-` gets a
206 with `Content-Range` (416 past the end). Each request is logged in `requests` with its range
and how many body bytes were actually written.

Misbehaviour, keyed by URL path (`/tuf/...`):
- `drop_after[path] = n`: the next response to `path` sends `n` body bytes, then cuts the
  connection (once; the entry is removed).
- `replace[path] = data`: serve `data` instead of the stored bytes.
- `endless`: answer with a body that never ends (no Content-Length) until the client hangs up.
- `stall`: send the headers, then nothing until the server stops.
- `ignore_range`: answer a ranged request with the whole file (200).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from securesystemslib.signer import SSlibKey

from ota.repository import PublishedFile
from ota.request_auth import RequestAuthError, verify_request
from tests.background_http import BackgroundHTTPServer

METADATA = "/tuf/metadata/"
TARGETS = "/tuf/targets/"
_RANGE = re.compile(r"^bytes=(\d+)-$")
_ENDLESS_CAP = 256 * 1024 * 1024


@dataclass
class Request:
    path: str
    range: str | None
    device: str | None
    status: int = 0
    sent: int = 0


@dataclass
class TufServer(BackgroundHTTPServer):
    metadata: dict[str, bytes] = field(default_factory=dict)
    targets: dict[str, bytes] = field(default_factory=dict)
    devices: dict[str, SSlibKey] = field(default_factory=dict)
    drop_after: dict[str, int] = field(default_factory=dict)
    replace: dict[str, bytes] = field(default_factory=dict)
    endless: set[str] = field(default_factory=set)
    stall: set[str] = field(default_factory=set)
    ignore_range: set[str] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    auth_failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._serve(_handler_for(self))

    # Content.

    def publish(self, files: Iterable[PublishedFile]) -> None:
        for published in files:
            self.metadata[published.filename] = published.data

    def add_target(self, path: str, data: bytes) -> str:
        """Store `data` for target `path`; returns its URL path (hash-prefixed)."""
        url_path = target_url_path(path, data)
        self.targets[url_path[len(TARGETS) :]] = data
        return url_path

    def register(self, device_id: str, key: SSlibKey) -> None:
        self.devices[device_id] = key

    # Inspection.

    def requests_for(self, path: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.path == path]

    def bytes_sent(self, path: str) -> int:
        return sum(r.sent for r in self.requests_for(path))

    # Serving.

    def _lookup(self, path: str) -> bytes | None:
        if path in self.replace:
            return self.replace[path]
        if path.startswith(METADATA):
            return self.metadata.get(path[len(METADATA) :])
        if path.startswith(TARGETS):
            return self.targets.get(path[len(TARGETS) :])
        return None


def target_url_path(path: str, data: bytes) -> str:
    directory, _, basename = path.rpartition("/")
    digest = hashlib.sha256(data).hexdigest()
    return f"{TARGETS}{directory}/{digest}.{basename}"


def _handler_for(server: TufServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            record = Request(path, self.headers.get("Range"), self.headers.get("Fleet-Device"))
            with server._lock:
                server.requests.append(record)
            try:
                headers = dict(self.headers.items())
                verify_request(headers, "GET", self.path, time.time(), server.devices.get)
            except RequestAuthError as exc:
                server.auth_failures.append(str(exc))
                self._status(record, 401)
                return
            data = server._lookup(path)
            if data is None:
                self._status(record, 404)
                return
            if path in server.endless:
                self._endless(record)
                return
            start = 0
            match = _RANGE.match(record.range or "")
            if match and path not in server.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self._status(record, 416, {"Content-Range": f"bytes */{len(data)}"})
                    return
            body = data[start:]
            record.status = 206 if start else 200
            self.send_response(record.status)
            self.send_header("Content-Length", str(len(body)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if path in server.stall:
                server._stopping.wait(10)
                return
            with server._lock:
                cut = server.drop_after.pop(path, None)
            if cut is not None and cut < len(body):
                self._write(record, body[:cut])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self._write(record, body)

        def _status(
            self, record: Request, status: int, headers: dict[str, str] | None = None
        ) -> None:
            record.status = status
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _endless(self, record: Request) -> None:
            record.status = 200
            self.send_response(200)
            self.end_headers()
            chunk = b"\0" * 65536
            try:
                while record.sent < _ENDLESS_CAP and not server._stopping.is_set():
                    self._write(record, chunk)
            except OSError:
                pass
            self.close_connection = True

        def _write(self, record: Request, data: bytes) -> None:
            self.wfile.write(data)
            record.sent += len(data)

    return Handler
