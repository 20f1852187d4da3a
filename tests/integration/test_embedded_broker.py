"""The embedded broker (fleet.broker) carries what the command channel relies on.

QoS 1 delivery in order, retained messages and last wills (each device's presence), a clean stop
that frees the port, and a clear `BrokerError` for a port in use, all with real aiomqtt clients
over TCP. "Nothing arrives" is proven with a marker published after, on the same connection or a
later one, never with a sleep. The throughput test prints a rough messages/s figure for one process
(broker and clients share the loop); it asserts delivery, not speed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from fleet.broker import BrokerError, EmbeddedBroker
from ota.protocol import Channel, device_subscriptions, topic
from tests.mosquitto import connect_and_drop

DEVICE = "e0e1e2e3e4e5e6e7"
OTHER = "f0f1f2f3f4f5f6f7"
WAIT_S = 5.0


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    async with EmbeddedBroker("127.0.0.1", 0) as running:
        yield running


def client(
    broker: EmbeddedBroker,
    identifier: str | None = None,
    *,
    will: aiomqtt.Will | None = None,
    logger: logging.Logger | None = None,
) -> aiomqtt.Client:
    return aiomqtt.Client(
        broker.host, broker.port, identifier=identifier, will=will, timeout=WAIT_S, logger=logger
    )


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex}".encode()


async def until(subscriber: aiomqtt.Client, payload: bytes) -> list[aiomqtt.Message]:
    """Every message `subscriber` receives up to and including the first with `payload`."""
    received: list[aiomqtt.Message] = []
    async with asyncio.timeout(WAIT_S):
        async for message in subscriber.messages:
            received.append(message)
            if message.payload == payload:
                return received
    raise AssertionError(f"disconnected before {payload!r}")


def summary(messages: list[aiomqtt.Message]) -> list[tuple[str, object, int, bool]]:
    return [(m.topic.value, m.payload, m.qos, m.retain) for m in messages]


async def test_reports_a_real_port_and_url(broker: EmbeddedBroker) -> None:
    assert broker.running
    assert broker.port != 0
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    with pytest.raises(BrokerError, match="already running"):
        await broker.start()


async def test_a_host_name_with_several_addresses_gets_one_port() -> None:
    async with EmbeddedBroker("localhost", 0) as broker:
        assert broker.url == f"mqtt://localhost:{broker.port}"
        for family in {info[0] for info in socket.getaddrinfo("localhost", broker.port)}:
            address = "::1" if family == socket.AF_INET6 else "127.0.0.1"
            with socket.create_connection((address, broker.port), timeout=WAIT_S):
                pass
        async with client(broker) as subscriber:
            await subscriber.subscribe("fleet/v1/#", qos=1)


async def test_qos1_messages_arrive_in_order(broker: EmbeddedBroker) -> None:
    payloads = [f"status-{i}".encode() for i in range(50)]
    async with client(broker) as subscriber, client(broker, DEVICE) as publisher:
        for topic_filter in device_subscriptions():
            await subscriber.subscribe(topic_filter, qos=1)
        for payload in payloads:
            await publisher.publish(topic(DEVICE, Channel.STATUS), payload, qos=1)
        received = await until(subscriber, payloads[-1])
    assert [m.payload for m in received] == payloads
    assert {(m.topic.value, m.qos, m.retain) for m in received} == {
        (topic(DEVICE, Channel.STATUS), 1, False)
    }


async def test_retained_presence_reaches_later_subscribers_until_cleared(
    broker: EmbeddedBroker,
) -> None:
    presence = topic(DEVICE, Channel.PRESENCE)
    online = marker()
    async with client(broker, DEVICE) as device:
        await device.publish(presence, online, qos=1, retain=True)

    async with client(broker) as controller:
        await controller.subscribe(f"fleet/v1/d/+/{Channel.PRESENCE}", qos=1)
        async with asyncio.timeout(WAIT_S):
            first = await anext(aiter(controller.messages))
        assert summary([first]) == [(presence, online, 1, True)]

    async with client(broker, DEVICE) as device:
        await device.publish(presence, b"", qos=1, retain=True)  # an empty retained message clears
    done = marker()
    async with client(broker) as controller, client(broker, OTHER) as other:
        await controller.subscribe(f"fleet/v1/d/+/{Channel.PRESENCE}", qos=1)
        await other.publish(topic(OTHER, Channel.PRESENCE), done, qos=1)
        assert [m.payload for m in await until(controller, done)] == [done]


async def test_a_client_gets_retained_messages_only_for_its_own_subscriptions(
    broker: EmbeddedBroker,
) -> None:
    # amqtt 0.12 alone sends a new session the retained messages of everyone's subscriptions.
    done = marker()
    async with client(broker, "controller") as controller:
        await controller.subscribe(f"fleet/v1/d/+/{Channel.PRESENCE}", qos=1)
        async with client(broker, OTHER) as other:
            await other.publish(topic(OTHER, Channel.PRESENCE), b"online", qos=1, retain=True)
        async with client(broker, DEVICE) as device:
            await device.subscribe(topic(DEVICE, Channel.CMD), qos=1)
            await controller.publish(topic(DEVICE, Channel.CMD), done, qos=1)
            assert summary(await until(device, done)) == [
                (topic(DEVICE, Channel.CMD), done, 1, False)
            ]


async def test_last_will_is_published_and_retained_on_abnormal_disconnect(
    broker: EmbeddedBroker,
) -> None:
    presence = topic(DEVICE, Channel.PRESENCE)
    offline = marker()
    async with client(broker) as controller:
        await controller.subscribe(presence, qos=1)
        accepted = await asyncio.to_thread(
            connect_and_drop,
            broker.host,
            broker.port,
            client_id=DEVICE,
            will_topic=presence,
            will_payload=offline,
        )
        assert accepted == 0
        # Delivered live to a subscriber, so without the retain flag (MQTT 3.3.1.3).
        assert summary(await until(controller, offline)) == [(presence, offline, 1, False)]

    async with client(broker) as controller:
        await controller.subscribe(presence, qos=1)
        async with asyncio.timeout(WAIT_S):
            retained = await anext(aiter(controller.messages))
        assert summary([retained]) == [(presence, offline, 1, True)]


async def test_no_last_will_after_a_clean_disconnect(broker: EmbeddedBroker) -> None:
    presence = topic(DEVICE, Channel.PRESENCE)
    done = marker()
    async with client(broker) as controller:
        await controller.subscribe("fleet/v1/#", qos=1)
        will = aiomqtt.Will(presence, b"offline", qos=1, retain=True)
        async with client(broker, DEVICE, will=will):
            pass
        # A later session (after the clean DISCONNECT was handled) publishes the marker.
        async with client(broker, OTHER) as other:
            await other.publish(topic(OTHER, Channel.STATUS), done, qos=1)
        assert [m.payload for m in await until(controller, done)] == [done]


async def test_stop_disconnects_clients_and_frees_the_port() -> None:
    broker = EmbeddedBroker("127.0.0.1", 0)
    await broker.start()
    port = broker.port
    async with client(broker) as subscriber:
        await subscriber.subscribe("fleet/v1/#", qos=1)
        await broker.stop()
        with pytest.raises(aiomqtt.MqttError):
            async with asyncio.timeout(WAIT_S):
                await anext(aiter(subscriber.messages))
    await broker.stop()  # idempotent
    assert not broker.running
    assert broker.port == 0

    # The port can be bound again: by a plain socket, and by a new broker that works.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    for again in (EmbeddedBroker("127.0.0.1", port), broker):  # a new one, and the same again
        async with again:
            assert again.port == port or (again is broker and again.port != 0)
            done = marker()
            async with client(again) as subscriber, client(again, DEVICE) as device:
                await subscriber.subscribe("fleet/v1/#", qos=1)
                await device.publish(topic(DEVICE, Channel.STATUS), done, qos=1)
                assert [m.payload for m in await until(subscriber, done)] == [done]


async def test_port_in_use_is_a_broker_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = EmbeddedBroker("127.0.0.1", port)
        with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{port}.*another MQTT broker"):
            await broker.start()
        assert not broker.running

    async with EmbeddedBroker("127.0.0.1", 0) as first:
        with pytest.raises(BrokerError, match=rf"127\.0\.0\.1:{first.port}"):
            await EmbeddedBroker("127.0.0.1", first.port).start()


@pytest.mark.parametrize("qos", [0, 1])
async def test_throughput_in_one_process(broker: EmbeddedBroker, qos: int) -> None:
    count = 3000
    payload = b"x" * 200  # about the size of a small signed status envelope
    last = marker()
    # aiomqtt warns about every publish call beyond ten in flight; that is the point here.
    quiet = logging.getLogger("tests.throughput")
    quiet.setLevel(logging.ERROR)
    async with client(broker) as subscriber, client(broker, DEVICE, logger=quiet) as publisher:
        await subscriber.subscribe(topic(DEVICE, Channel.TELEMETRY), qos=qos)
        name = topic(DEVICE, Channel.TELEMETRY)
        started = time.perf_counter()
        await asyncio.gather(*(publisher.publish(name, payload, qos=qos) for _ in range(count)))
        await publisher.publish(name, last, qos=qos)
        received = 0
        async with asyncio.timeout(60):
            async for message in subscriber.messages:
                received += 1
                if message.payload == last:
                    break
        elapsed = time.perf_counter() - started
    # QoS 0 may drop under load in principle; over loopback it should not, and a loss would show.
    assert received == count + 1
    print(
        f"\nembedded broker, QoS {qos}: {received} messages in {elapsed:.2f}s, "
        f"{received / elapsed:.0f} msgs/s (one process, one publisher, one subscriber)"
    )
