"""A TCP relay for tests: pause a connection, or record every byte a client sends through it.

`GatedProxy(upstream)` listens on 127.0.0.1 (`url`, `port`) and relays each connection to
`upstream`, which may be set after the proxy exists (a broker whose port is known later). While
held (`hold()`), nothing is connected or forwarded; `closed_for_new()` refuses new connections
outright (the device sees the service gone). `sent` holds everything clients sent upstream, so a
test can prove what left a device.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass
class GatedProxy:
    """Relays 127.0.0.1:`port` to `upstream`; while held, nothing is connected or forwarded."""

    upstream: tuple[str, int] | None
    gate: threading.Event = field(default_factory=threading.Event)
    refusing: bool = False  # new connections are closed at once (the service is "down")
    _listener: socket.socket = field(init=False)
    _sockets: list[socket.socket] = field(default_factory=list)
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    sent: bytearray = field(default_factory=bytearray)  # every byte clients sent upstream
    refused: int = 0  # connections the upstream refused (the controller was down)

    def __post_init__(self) -> None:
        self.gate.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self) -> None:
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    def cut(self) -> None:
        """Refuse new connections and drop the open ones (the network is gone)."""
        self.refusing = True
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()
        self._sockets.clear()

    def restore(self) -> None:
        self.refusing = False

    def close(self) -> None:
        self._closed = True
        self.gate.set()
        for sock in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            self._sockets.append(client)
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self.gate.wait()
        try:
            assert self.upstream is not None, "the relay has no upstream yet"
            upstream = socket.create_connection(self.upstream, 5)
        except OSError:  # the upstream is down: the client sees its connection closed
            self.refused += 1
            client.close()
            return
        upstream.settimeout(None)
        self._sockets.append(upstream)
        threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                self.gate.wait()
                if record:
                    with self._lock:
                        self.sent += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
