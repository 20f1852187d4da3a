"""The shipped Mosquitto config (deploy/mosquitto) enforces mutual TLS and the per-device ACL.

Each test starts a real mosquitto on the repository's mosquitto.conf and acl (only paths and the
port substituted, see tests/mosquitto.py) with a throwaway Ed25519 PKI, and talks to it with
aiomqtt over TLS. "Receives nothing" is proven without sleeping: after the forbidden message, a
marker goes down a path that is allowed and orders after it (same connection, or a later TLS
handshake), and the receiver must see the marker with nothing forbidden before it.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest

from ota.protocol import Channel, device_subscriptions, topic
from tests.mosquitto import Mosquitto, connect_and_drop, require_mosquitto, run_mosquitto
from tests.pki import CertificateAuthority, Issued, client_tls_context

CONTROLLER = "fleet-controller"
DEVICE_A = "a1b2c3d4e5f60001"
DEVICE_B = "a1b2c3d4e5f60002"
WAIT_S = 5.0
# Over TLS 1.3 the server checks the client certificate after the client has finished its
# handshake, and aiomqtt ignores a connection lost before CONNACK, so a refused client only
# notices by timing out; under TLS 1.2 the handshake itself fails at once.
REFUSED_TIMEOUT_S = 2.0
TLS_VERSIONS = [
    pytest.param(ssl.TLSVersion.TLSv1_2, id="tls1.2"),
    pytest.param(ssl.TLSVersion.TLSv1_3, id="tls1.3"),
]


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: Issued
    controller: Issued
    device_a: Issued
    device_b: Issued
    rogue_controller: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_mosquitto()
    ca = CertificateAuthority.create(tmp_path_factory.mktemp("pki"), "Fleet CA")
    rogue = CertificateAuthority.create(tmp_path_factory.mktemp("rogue"), "Rogue CA")
    return Pki(
        ca=ca,
        server=ca.server(),
        controller=ca.client(CONTROLLER),
        device_a=ca.client(DEVICE_A),
        device_b=ca.client(DEVICE_B),
        rogue_controller=rogue.client(CONTROLLER),
    )


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Mosquitto]:
    with run_mosquitto(
        tmp_path / "mosquitto",
        ca_cert=pki.ca.cert_path,
        server_cert=pki.server.cert,
        server_key=pki.server.key,
    ) as running:
        yield running
        # Shown by pytest only when the test failed.
        print(f"--- mosquitto log ({running.log_path}) ---\n{running.log()}")


def connect(
    broker: Mosquitto,
    pki: Pki,
    identity: Issued | None,
    *,
    identifier: str | None = None,
    username: str | None = None,
    tls_version: ssl.TLSVersion | None = None,
    timeout: float = WAIT_S,
) -> aiomqtt.Client:
    context = client_tls_context(pki.ca.cert_path, identity)
    if tls_version is not None:
        context.minimum_version = context.maximum_version = tls_version
    return aiomqtt.Client(
        broker.host,
        broker.port,
        identifier=identifier,
        username=username,
        password="ignored" if username else None,
        tls_context=context,
        timeout=timeout,
    )


def marker() -> bytes:
    return f"marker-{uuid.uuid4().hex}".encode()


async def until(client: aiomqtt.Client, payload: bytes) -> list[tuple[str, bytes]]:
    """Every (topic, payload) `client` receives up to and including the first `payload`."""
    received: list[tuple[str, bytes]] = []
    async with asyncio.timeout(WAIT_S):
        async for message in client.messages:
            data = message.payload
            assert isinstance(data, bytes | bytearray)
            received.append((message.topic.value, bytes(data)))
            if data == payload:
                return received
    raise AssertionError(f"disconnected before {payload!r}; got {received}")


async def wait_for_log(broker: Mosquitto, text: str, since: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in broker.log()[since:]:
        assert time.monotonic() < deadline, f"{text!r} not in the broker log"
        await asyncio.sleep(0.02)


# Who may connect.


@pytest.mark.parametrize("tls_version", TLS_VERSIONS)
async def test_client_without_a_certificate_cannot_connect(
    broker: Mosquitto, pki: Pki, tls_version: ssl.TLSVersion
) -> None:
    since = len(broker.log())
    with pytest.raises(aiomqtt.MqttError):
        async with connect(
            broker, pki, None, tls_version=tls_version, timeout=REFUSED_TIMEOUT_S
        ) as client:
            await client.subscribe("fleet/v1/#")
    await wait_for_log(broker, "peer did not return a certificate", since)


@pytest.mark.parametrize("tls_version", TLS_VERSIONS)
async def test_certificate_from_another_ca_cannot_connect(
    broker: Mosquitto, pki: Pki, tls_version: ssl.TLSVersion
) -> None:
    # The rogue certificate even claims to be the controller.
    since = len(broker.log())
    with pytest.raises(aiomqtt.MqttError):
        async with connect(
            broker, pki, pki.rogue_controller, tls_version=tls_version, timeout=REFUSED_TIMEOUT_S
        ) as client:
            await client.subscribe("fleet/v1/#")
    await wait_for_log(broker, "certificate verify failed", since)


def test_plain_mqtt_is_not_served(broker: Mosquitto) -> None:
    with pytest.raises(OSError):
        connect_and_drop(
            broker.host,
            broker.port,
            client_id=DEVICE_A,
            will_topic=topic(DEVICE_A, Channel.PRESENCE),
            will_payload=b"offline",
            timeout=WAIT_S,
        )


# What a device may write.


@pytest.mark.parametrize("share_group", [None, "controllers"], ids=["plain", "shared"])
async def test_device_publishes_on_its_own_topics_and_the_controller_receives(
    broker: Mosquitto, pki: Pki, share_group: str | None
) -> None:
    sent = [
        (topic(DEVICE_A, channel), marker()) for channel in Channel if channel is not Channel.CMD
    ]
    async with (
        connect(broker, pki, pki.controller) as controller,
        connect(broker, pki, pki.device_a, identifier=DEVICE_A) as device,
    ):
        for topic_filter in device_subscriptions(share_group):
            await controller.subscribe(topic_filter, qos=1)
        for name, payload in sent:
            await device.publish(name, payload, qos=1, retain=name.endswith("/presence"))
        assert await until(controller, sent[-1][1]) == sent


async def test_device_cannot_publish_outside_its_own_topics(broker: Mosquitto, pki: Pki) -> None:
    forbidden = [
        *(topic(DEVICE_B, channel) for channel in Channel),
        topic(DEVICE_A, Channel.CMD),
        f"fleet/v1/d/{DEVICE_A}/other",
        f"fleet/v1/d/{DEVICE_A}/status/more",
        f"fleet/v1/d/{DEVICE_A}",
        "fleet/v1/broadcast",
        f"fleet/v1/d/{CONTROLLER}/status",
    ]
    done = marker()
    async with (
        connect(broker, pki, pki.controller) as controller,
        connect(broker, pki, pki.device_a, identifier=DEVICE_A) as device,
    ):
        await controller.subscribe("fleet/v1/#", qos=1)
        for name in forbidden:
            await device.publish(name, b"forged", qos=1, retain=True)
        await device.publish(topic(DEVICE_A, Channel.STATUS), done, qos=1)
        assert await until(controller, done) == [(topic(DEVICE_A, Channel.STATUS), done)]

    # Nothing forbidden was retained either: a fresh subscriber gets no retained messages.
    done = marker()
    async with (
        connect(broker, pki, pki.controller) as controller,
        connect(broker, pki, pki.device_a, identifier=DEVICE_A) as device,
    ):
        await controller.subscribe("fleet/v1/#", qos=1)
        await device.publish(topic(DEVICE_A, Channel.STATUS), done, qos=1)
        assert await until(controller, done) == [(topic(DEVICE_A, Channel.STATUS), done)]


async def test_device_last_will_only_on_its_own_presence(broker: Mosquitto, pki: Pki) -> None:
    own, forged = marker(), marker()
    tls = client_tls_context(pki.ca.cert_path, pki.device_a)
    async with connect(broker, pki, pki.controller) as controller:
        await controller.subscribe("fleet/v1/#", qos=1)
        # Each drop is a fresh TLS session, so the broker has handled the first before the second.
        for will_topic, payload in [
            (topic(DEVICE_B, Channel.PRESENCE), forged),
            (topic(DEVICE_A, Channel.PRESENCE), own),
        ]:
            accepted = await asyncio.to_thread(
                connect_and_drop,
                broker.host,
                broker.port,
                client_id=DEVICE_A,
                will_topic=will_topic,
                will_payload=payload,
                tls=tls,
            )
            assert accepted == 0
        assert await until(controller, own) == [(topic(DEVICE_A, Channel.PRESENCE), own)]

    # The will was retained, and a controller that connects later still gets it.
    async with connect(broker, pki, pki.controller) as controller:
        await controller.subscribe(topic(DEVICE_A, Channel.PRESENCE), qos=1)
        async with asyncio.timeout(WAIT_S):
            message = await anext(aiter(controller.messages))
        assert (message.payload, message.retain) == (own, True)


async def test_an_oversized_message_is_refused(broker: Mosquitto, pki: Pki) -> None:
    done = marker()
    async with connect(broker, pki, pki.controller) as controller:
        await controller.subscribe("fleet/v1/#", qos=1)
        since = len(broker.log())
        with pytest.raises(aiomqtt.MqttError):
            async with connect(broker, pki, pki.device_a, identifier=DEVICE_A) as device:
                await device.publish(topic(DEVICE_A, Channel.STATUS), b"x" * 200_000, qos=0)
                async with asyncio.timeout(WAIT_S):
                    async for message in device.messages:  # ends when the broker hangs up
                        raise AssertionError(f"unexpected {message.topic}")
        await wait_for_log(broker, "disconnected due to oversize packet", since)
        async with connect(broker, pki, pki.device_a, identifier=DEVICE_A) as device:
            await device.publish(topic(DEVICE_A, Channel.STATUS), done, qos=1)
        assert await until(controller, done) == [(topic(DEVICE_A, Channel.STATUS), done)]


# What a device may read.


async def test_device_cannot_read_another_devices_commands(broker: Mosquitto, pki: Pki) -> None:
    for_b, for_a = marker(), marker()
    async with (
        connect(broker, pki, pki.controller) as controller,
        connect(broker, pki, pki.device_a, identifier=DEVICE_A) as device_a,
        connect(broker, pki, pki.device_b, identifier=DEVICE_B) as device_b,
    ):
        # Mosquitto grants these subscriptions and filters every message by the ACL on delivery.
        for topic_filter in [topic(DEVICE_B, Channel.CMD), "fleet/v1/#", "#"]:
            await device_a.subscribe(topic_filter, qos=1)
        await device_a.subscribe(topic(DEVICE_A, Channel.CMD), qos=1)
        await device_b.subscribe(topic(DEVICE_B, Channel.CMD), qos=1)
        await controller.subscribe("fleet/v1/#", qos=1)
        await controller.publish(topic(DEVICE_B, Channel.CMD), for_b, qos=1)
        # The controller's own status-like traffic is also invisible to A.
        await controller.publish(topic(DEVICE_B, Channel.STATUS), b"b-status", qos=1)
        await controller.publish(topic(DEVICE_A, Channel.CMD), for_a, qos=1)

        received_by_a = await until(device_a, for_a)
        assert {name for name, _ in received_by_a} == {topic(DEVICE_A, Channel.CMD)}
        assert {payload for _, payload in received_by_a} == {for_a}
        assert await until(device_b, for_b) == [(topic(DEVICE_B, Channel.CMD), for_b)]


async def test_username_in_connect_does_not_change_the_identity(
    broker: Mosquitto, pki: Pki
) -> None:
    for_b, for_a = marker(), marker()
    async with (
        connect(broker, pki, pki.controller) as controller,
        connect(broker, pki, pki.device_a, identifier=DEVICE_A, username=CONTROLLER) as pretender,
    ):
        await pretender.subscribe("fleet/v1/#", qos=1)
        await controller.subscribe("fleet/v1/#", qos=1)
        await pretender.publish(topic(DEVICE_B, Channel.STATUS), b"forged", qos=1)
        await controller.publish(topic(DEVICE_B, Channel.CMD), for_b, qos=1)
        await controller.publish(topic(DEVICE_A, Channel.CMD), for_a, qos=1)
        assert await until(pretender, for_a) == [(topic(DEVICE_A, Channel.CMD), for_a)]
        # The controller sees its own two commands, never the forged status.
        seen = await until(controller, for_a)
        assert [name for name, _ in seen] == [
            topic(DEVICE_B, Channel.CMD),
            topic(DEVICE_A, Channel.CMD),
        ]


# What the controller may do.


async def test_controller_can_publish_to_any_devices_commands(broker: Mosquitto, pki: Pki) -> None:
    for_a, for_b = marker(), marker()
    async with (
        connect(broker, pki, pki.controller) as controller,
        connect(broker, pki, pki.device_a, identifier=DEVICE_A) as device_a,
        connect(broker, pki, pki.device_b, identifier=DEVICE_B) as device_b,
    ):
        await device_a.subscribe(topic(DEVICE_A, Channel.CMD), qos=1)
        await device_b.subscribe(topic(DEVICE_B, Channel.CMD), qos=1)
        await controller.publish(topic(DEVICE_A, Channel.CMD), for_a, qos=1)
        await controller.publish(topic(DEVICE_B, Channel.CMD), for_b, qos=1)
        assert await until(device_a, for_a) == [(topic(DEVICE_A, Channel.CMD), for_a)]
        assert await until(device_b, for_b) == [(topic(DEVICE_B, Channel.CMD), for_b)]
