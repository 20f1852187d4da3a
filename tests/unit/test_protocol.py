"""The wire protocol's receiver checks, with real keys and real DSSE envelopes."""

from __future__ import annotations

import base64
import json

import pytest
from securesystemslib.signer import CryptoSigner, Key

from attestation.envelope import seal
from attestation.keys import public_key_of
from ota.protocol import (
    CONTROLLER,
    MAX_MESSAGE_BYTES,
    PAYLOAD_TYPE,
    Channel,
    Message,
    MessageType,
    Refusal,
    command_id,
    device_subscriptions,
    open_message,
    parse_topic,
    seal_message,
    topic,
)

NOW = 1_800_000_000.0
DEVICE = "dabcdefghijklmnopqrstuvwxyz234567"
OTHER = "d234567abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def command_signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.fixture(scope="module")
def device_signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


def command(seq: int = 5, **changes: object) -> Message:
    fields: dict[str, object] = {
        "iss": CONTROLLER,
        "aud": DEVICE,
        "seq": seq,
        "iat": NOW,
        "exp": NOW + 600,
        "type": MessageType.DEPLOY,
        "body": {"command_id": "c1", "target": "default/sine@1.0.0"},
    }
    fields.update(changes)
    return Message(**fields)  # type: ignore[arg-type]


def open_command(data: bytes, key: Key, last: int = 4, now: float = NOW) -> Message:
    return open_message(
        data,
        audience=DEVICE,
        channel=Channel.CMD,
        key_for=lambda iss: key if iss == CONTROLLER else None,
        last_seq=lambda iss: last,
        now=now,
    )


def test_a_sealed_command_opens_to_the_same_message(command_signer: CryptoSigner) -> None:
    message = command()
    opened = open_command(seal_message(message, command_signer), public_key_of(command_signer))
    assert opened == message
    assert command_id(opened) == "c1"


@pytest.mark.parametrize(
    ("message", "last", "now", "kind"),
    [
        (command(seq=4), 4, NOW, "replayed"),
        (command(seq=3), 4, NOW, "replayed"),
        (command(aud=OTHER), 4, NOW, "wrong-audience"),
        (command(exp=NOW - 1), 4, NOW, "expired"),
        (command(iat=NOW + 3600, exp=NOW + 7200), 4, NOW, "not-yet-valid"),
        (command(type=MessageType.HELLO), 4, NOW, "wrong-type"),
        (command(iss="someone"), 4, NOW, "unknown-sender"),
    ],
)
def test_the_receiver_refuses(
    command_signer: CryptoSigner, message: Message, last: int, now: float, kind: str
) -> None:
    with pytest.raises(Refusal) as refused:
        open_command(seal_message(message, command_signer), public_key_of(command_signer), last)
    assert refused.value.kind == kind


def test_a_command_signed_by_another_key_is_refused(
    command_signer: CryptoSigner, device_signer: CryptoSigner
) -> None:
    forged = seal_message(command(), device_signer)
    with pytest.raises(Refusal) as refused:
        open_command(forged, public_key_of(command_signer))
    assert refused.value.kind == "unknown-key"


def test_a_tampered_payload_is_refused(command_signer: CryptoSigner) -> None:
    envelope = json.loads(seal_message(command(), command_signer))
    payload = json.loads(base64.b64decode(envelope["payload"]))
    payload["body"]["target"] = "default/evil@9.9.9"
    envelope["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    with pytest.raises(Refusal) as refused:
        open_command(json.dumps(envelope).encode(), public_key_of(command_signer))
    assert refused.value.kind == "bad-signature"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"payload": "!!", "payloadType": "x", "signatures": []}',
        json.dumps({"payload": "e30=", "payloadType": PAYLOAD_TYPE, "signatures": []}).encode(),
        b"{" + b" " * MAX_MESSAGE_BYTES + b"}",
    ],
)
def test_garbage_is_refused_as_malformed(command_signer: CryptoSigner, data: bytes) -> None:
    with pytest.raises(Refusal) as refused:
        open_command(data, public_key_of(command_signer))
    assert refused.value.kind in {"malformed", "oversized"}


def test_a_payload_that_is_signed_but_not_a_message_is_refused(
    command_signer: CryptoSigner,
) -> None:
    data = seal(b'{"iss": "controller", "seq": "one"}', PAYLOAD_TYPE, command_signer)
    with pytest.raises(Refusal) as refused:
        open_command(data, public_key_of(command_signer))
    assert refused.value.kind == "malformed"


def test_a_device_message_on_another_devices_topic_is_spoofed(
    device_signer: CryptoSigner,
) -> None:
    status = Message(DEVICE, CONTROLLER, 1, NOW, NOW + 60, MessageType.STATUS, {})
    with pytest.raises(Refusal) as refused:
        open_message(
            seal_message(status, device_signer),
            audience=CONTROLLER,
            channel=Channel.STATUS,
            key_for=lambda iss: public_key_of(device_signer),
            last_seq=lambda iss: 0,
            now=NOW,
            topic_sender=OTHER,
        )
    assert refused.value.kind == "spoofed"


def test_topics_round_trip_and_reject_strangers() -> None:
    assert parse_topic(topic(DEVICE, Channel.STATUS)) == (DEVICE, Channel.STATUS)
    assert parse_topic("fleet/v1/d/UPPER/status") is None
    assert parse_topic("fleet/v1/d/dabcdefgh/secrets") is None
    assert parse_topic("other/v1/d/dabcdefgh/status") is None
    with pytest.raises(ValueError, match="not a device id"):
        topic("../x", Channel.CMD)
    assert all(f.startswith("$share/g/fleet/v1/d/+/") for f in device_subscriptions("g"))
