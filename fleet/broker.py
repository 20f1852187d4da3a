"""The embedded MQTT broker of `fleetctl serve` and `fleetctl demo`: amqtt in the controller loop.

For development and demos only. Rules it enforces:
- Anyone who can reach the port may connect: anonymous, no TLS, no ACL, so any client can publish
  and subscribe to any topic, and MQTT 3.1.1 only. It listens on 127.0.0.1 unless told otherwise.
  A real fleet uses a broker with mutual TLS and the per-device ACL (deploy/mosquitto,
  docs/broker.md). Every Fleet message is still a signed envelope that its receiver verifies
  (ota.protocol), so this broker can misroute or drop messages but not forge them.
- The listening socket is opened here, before amqtt starts, on exactly `host`:`port`; port 0 picks
  a free port, and after `start()` `port` and `url` report the real one. A port that cannot be
  bound (in use, not permitted, no such address) raises `BrokerError` naming `host:port` and
  what to do; nothing is left running.
- Nothing is written to disk: sessions, subscriptions and retained messages (each device's
  presence) live in memory and are gone after `stop()`. amqtt's $SYS topics and packet logging
  are off.
- amqtt logs every connection and packet at INFO/DEBUG; its loggers (and those of `transitions`,
  its state-machine library) are set to `log_level`, WARNING unless told otherwise.
- `start()` on a started broker raises `BrokerError`; `stop()` closes the listener, every client
  connection and amqtt, and may be called any number of times. The instance can start again.

amqtt 0.12 quirks, for whoever debugs against it:
- amqtt sends each new connection, at QoS 0, every retained message that matches any client's
  subscription (it replays retained messages for all of the broker's topic filters, not only the
  session's own), so a device would get other devices' presence without subscribing to it.
  `_FleetBroker` replays only for the filters the session itself holds, at their QoS.
- With anonymous access every session counts as anonymous, and amqtt neither keeps a disconnected
  anonymous session nor queues QoS 1/2 messages for it: a client with `clean_session=False` gets
  nothing published while it was away. The command outbox re-sends on reconnect for this reason.
- No shared subscriptions: `$share/GROUP/FILTER` is granted and never delivers anything, so a
  controller must not use a share group with this broker.
- A message is delivered at the subscription's QoS, whatever QoS it was published with.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from typing import Any

from amqtt.adapters import (  # type: ignore[import-untyped]
    StreamReaderAdapter,
    StreamWriterAdapter,
)
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.session import Session  # type: ignore[import-untyped]

LISTENER = "default"
QUIET_LOGGERS = ("amqtt", "transitions")


class _FleetBroker(Broker):  # type: ignore[misc]
    """amqtt's broker, replaying retained messages only for a session's own subscriptions."""

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        granted = [
            qos
            for held, qos in self._subscriptions.get(topic_filter, ())
            if held.client_id == session.client_id
        ]
        if granted:
            await super()._publish_retained_messages_for_subscription(
                (topic_filter, granted[0]), session
            )


class BrokerError(Exception):
    """The embedded broker cannot start (or was started twice); the message says what to do."""


class EmbeddedBroker:
    """An in-memory MQTT 3.1.1 broker on `host`:`port`; see the module docstring for its limits."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 1883, *, log_level: int = logging.WARNING
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not in 0..65535")
        self.host = host
        self._requested_port = port
        self._port: int | None = None
        self._log_level = log_level
        self._broker: Any = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port it listens on: the real one once started (also when asked for port 0)."""
        return self._port if self._port is not None else self._requested_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            raise BrokerError(f"the embedded broker on {self.url} is already running")
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(self._log_level)
        server = await self._listen(self._requested_port)
        first: int = server.sockets[0].getsockname()[1]
        if any(sock.getsockname()[1] != first for sock in server.sockets):
            # Port 0 on a name with several addresses (localhost: ::1 and 127.0.0.1) got one
            # port per address; listen on the first one's everywhere.
            server.close()
            await server.wait_closed()
            server = await self._listen(first)
        broker = _FleetBroker(_config())
        try:
            await broker.start()
        except Exception as exc:
            server.close()
            await server.wait_closed()
            raise BrokerError(f"the embedded MQTT broker failed to start: {exc}") from exc
        self._broker = broker
        self._server = server
        self._port = first
        await server.start_serving()

    async def stop(self) -> None:
        server, broker = self._server, self._broker
        self._server = self._broker = None
        if server is not None:
            server.close()
        if broker is not None:
            await broker.shutdown()
        # Connections amqtt had not taken over yet (no CONNECT received) are still open.
        for writer in list(self._writers):
            writer.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        self._port = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _listen(self, port: int) -> asyncio.Server:
        try:
            return await asyncio.start_server(
                self._connected, self.host, port, reuse_address=True, start_serving=False
            )
        except OSError as exc:
            raise BrokerError(self._bind_failure(exc, port)) from exc

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        broker = self._broker
        if broker is None:  # accepted while stopping
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._writers.add(writer)
        try:
            await broker.external_connected(
                StreamReaderAdapter(reader), StreamWriterAdapter(writer), LISTENER
            )
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away; amqtt has cleaned up its session
        finally:
            self._connections.discard(task)
            self._writers.discard(writer)
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    def _bind_failure(self, exc: OSError, port: int) -> str:
        where = f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"
        reason = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            advice = (
                "another MQTT broker (or another fleetctl) is already listening there: stop it, "
                "give the embedded broker another port (0 picks a free one), or point the "
                "controller at an external broker URL"
            )
        else:
            advice = (
                "check the host is an address of this machine and the port is one this user "
                "may bind (ports below 1024 need privileges), or use an external broker URL"
            )
        return f"the embedded MQTT broker cannot listen on {where}: {reason}; {advice}"


def _config() -> dict[str, Any]:
    """amqtt 0.12's broker config: one externally fed listener, anonymous auth, no other plugin."""
    return {
        "listeners": {LISTENER: {"type": "external"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }
