"""Run the shipped Mosquitto configuration (deploy/mosquitto) as a real broker for a test.

`run_mosquitto(directory, ca_cert=..., server_cert=..., server_key=...)` renders
deploy/mosquitto/mosquitto.conf into `directory` and starts `/usr/sbin/mosquitto -c` on it. Rules:
- The shipped file is used as it is. Only the operator-marked lines are replaced: `listener` (a
  free port on `host`), `cafile`, `certfile`, `keyfile`, `acl_file` (deploy/mosquitto/acl unless
  another is given), `persistence_location` (inside `directory`) and `user` (the current user, so
  a broker started by root does not switch to an account that cannot read the test's files).
  Each of those must appear exactly once, uncommented, or rendering fails: a test never runs
  against a config the repository does not ship.
- The context manager returns only once the listener completes TLS handshakes (it checks the
  broker's certificate against `ca_cert` and the host name); a broker that exits or does not
  answer within `timeout` raises `MosquittoError` carrying its log. A port taken between choosing
  and binding is retried on another port.
- On exit the broker is terminated (SIGTERM) and killed if it has not exited within `stop_timeout`.
  An exception leaving the block gets the broker's log attached as a note.
- Without `/usr/sbin/mosquitto` the calling test is skipped with the reason; with
  FLEET_TEST_REQUIRE_SERVICES=1 it fails instead (`require_mosquitto`).

`connect_and_drop` opens a raw MQTT 3.1.1 session with a last will and closes the socket without a
DISCONNECT, which is what makes a broker publish the will; no client library exposes that.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "mosquitto"
CONFIG = DEPLOY / "mosquitto.conf"
ACL = DEPLOY / "acl"
MOSQUITTO = Path("/usr/sbin/mosquitto")
_PORT_ATTEMPTS = 3


class MosquittoError(RuntimeError):
    """The broker did not start, or stopped unexpectedly; the message includes its log."""


def require_mosquitto() -> Path:
    """The mosquitto binary, or skip (fail with FLEET_TEST_REQUIRE_SERVICES=1) without it."""
    if MOSQUITTO.is_file() and os.access(MOSQUITTO, os.X_OK):
        return MOSQUITTO
    message = f"{MOSQUITTO} is not installed (apt-get install mosquitto)"
    if os.environ.get("FLEET_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}, and FLEET_TEST_REQUIRE_SERVICES=1 requires it")
    pytest.skip(message)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def render_config(
    template: str,
    *,
    host: str,
    port: int,
    cafile: Path,
    certfile: Path,
    keyfile: Path,
    acl_file: Path,
    persistence_dir: Path,
    user: str,
) -> str:
    """`template` with the operator-marked directives replaced; every other line is kept."""
    values = {
        "listener": f"{port} {host}",
        "cafile": str(cafile),
        "certfile": str(certfile),
        "keyfile": str(keyfile),
        "acl_file": str(acl_file),
        "persistence_location": f"{persistence_dir}/",
        "user": user,
    }
    seen = dict.fromkeys(values, 0)
    lines = []
    for line in template.splitlines():
        directive = line.split(maxsplit=1)[0] if line.strip() else ""
        if directive in values:
            seen[directive] += 1
            line = f"{directive} {values[directive]}"
        lines.append(line)
    wrong = {directive: count for directive, count in seen.items() if count != 1}
    if wrong:
        raise ValueError(f"the shipped config must set each of these exactly once: {wrong}")
    return "\n".join(lines) + "\n"


@dataclass
class Mosquitto:
    """A running broker: where it listens, its process, config and log."""

    host: str
    port: int
    process: subprocess.Popen[bytes]
    config: Path
    log_path: Path

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the broker has not exited within `timeout` seconds."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def _wait_ready(broker: Mosquitto, ca_cert: Path, timeout: float) -> None:
    """Return once the broker completes a TLS handshake; raise `MosquittoError` otherwise."""
    probe = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_cert))
    deadline = time.monotonic() + timeout
    while True:
        if broker.process.poll() is not None:
            raise MosquittoError(
                f"mosquitto exited with status {broker.process.returncode}:\n{broker.log()}"
            )
        if time.monotonic() > deadline:
            raise MosquittoError(
                f"mosquitto did not accept TLS on {broker.host}:{broker.port} "
                f"within {timeout}s:\n{broker.log()}"
            )
        try:
            sock = socket.create_connection((broker.host, broker.port), timeout=1.0)
        except OSError:
            time.sleep(0.02)
            continue
        with sock:
            try:
                with probe.wrap_socket(sock, server_hostname=broker.host):
                    return
            except ssl.SSLCertVerificationError as exc:
                raise MosquittoError(
                    f"the broker's certificate does not verify against {ca_cert}: {exc}"
                ) from exc
            except (ssl.SSLError, ConnectionResetError):
                # The listener answered in TLS and refused us for having no client
                # certificate (TLS 1.2 fails the handshake itself): it is up.
                return


@contextlib.contextmanager
def run_mosquitto(
    directory: Path,
    *,
    ca_cert: Path,
    server_cert: Path,
    server_key: Path,
    acl: Path = ACL,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    stop_timeout: float = 5.0,
) -> Iterator[Mosquitto]:
    """Start the shipped config on a free port of `host`; see the module docstring."""
    executable = require_mosquitto()
    directory.mkdir(parents=True, exist_ok=True)
    persistence = directory / "persistence"
    persistence.mkdir(exist_ok=True)
    template = CONFIG.read_text()
    broker: Mosquitto | None = None
    for attempt in range(_PORT_ATTEMPTS):
        port = free_port(host)
        config = directory / "mosquitto.conf"
        config.write_text(
            render_config(
                template,
                host=host,
                port=port,
                cafile=ca_cert,
                certfile=server_cert,
                keyfile=server_key,
                acl_file=acl,
                persistence_dir=persistence,
                user=getpass.getuser(),
            )
        )
        log_path = directory / f"mosquitto-{port}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [str(executable), "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        candidate = Mosquitto(host, port, process, config, log_path)
        try:
            _wait_ready(candidate, ca_cert, timeout)
        except MosquittoError:
            candidate.stop(stop_timeout)
            if "Address already in use" in candidate.log() and attempt + 1 < _PORT_ATTEMPTS:
                continue
            raise
        broker = candidate
        break
    assert broker is not None
    try:
        yield broker
    except Exception as exc:
        exc.add_note(f"mosquitto log ({broker.log_path}):\n{broker.log()}")
        raise
    finally:
        broker.stop(stop_timeout)


# Raw MQTT 3.1.1, for what client libraries hide.


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(length: int) -> bytes:
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(encoded)


def connect_and_drop(
    host: str,
    port: int,
    *,
    client_id: str,
    will_topic: str,
    will_payload: bytes,
    will_qos: int = 1,
    will_retain: bool = True,
    tls: ssl.SSLContext | None = None,
    timeout: float = 5.0,
) -> int:
    """CONNECT with a last will, read the CONNACK, then close the socket without DISCONNECT.

    Returns the CONNACK return code (0 = accepted). The broker sees the connection drop and, if it
    accepted the session, publishes the will.
    """
    flags = 0x02 | 0x04 | (will_qos << 3) | (0x20 if will_retain else 0)  # clean, will, qos, retain
    variable = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", 60)
    payload = _utf8(client_id) + _utf8(will_topic) + struct.pack("!H", len(will_payload))
    payload += will_payload
    body = variable + payload
    packet = bytes([0x10]) + _remaining_length(len(body)) + body
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = tls.wrap_socket(raw, server_hostname=host) if tls else raw
    with sock:
        sock.sendall(packet)
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            if not chunk:
                raise ConnectionError(f"the broker closed the connection after {connack!r}")
            connack += chunk
        if connack[0] != 0x20:
            raise ConnectionError(f"expected a CONNACK, got {connack!r}")
        # Abort rather than close cleanly: no TLS close_notify, no FIN handshake to wait on.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return connack[3]
