"""The command channel's wire protocol: topics, signed messages, and the checks a receiver makes.

Everything here is sans-I/O: bytes, keys and clocks in, a `Message` or a `Refusal` out. The broker
is untrusted transport, so a receiver decides from the envelope alone.

Rules:
- Topics are `fleet/v1/d/{device id}/{channel}`. The controller writes only `cmd`; a device writes
  only `status`, `evidence`, `telemetry` and `presence` (retained, also its last will).
- Every message is a DSSE envelope (`attestation.envelope`) of `PAYLOAD_TYPE` whose payload is a
  JSON object with `iss`, `aud`, `seq`, `iat`, `exp`, `type` and `body`, at most
  `MAX_MESSAGE_BYTES`.
- `open_message` refuses, in this order and naming the reason: a malformed or oversized envelope;
  an issuer it has no key for (`unknown-sender`); a signature by another key or one that does
  not verify; a device message on another device's topic (`spoofed`); another audience; a type the
  receiver does not take on that channel; an `iat` more than `MAX_CLOCK_SKEW_S` ahead; a passed
  `exp`; a `seq` not above the last one accepted from that sender (`replayed`). The payload is not
  trusted, nor even read past `iss`, until the signature has verified.
- `seq` is strictly increasing per sender and receiver; the receiver persists the last one it
  accepted (and the sender the last one it used) before acting, so a restart cannot reopen a
  replay window. `presence` has its own sequence, because a last will is signed when the session
  opens and published by the broker later.
- A command carries a `command_id`; receivers handle a command id at most once, so the outbox may
  re-send a command in a fresh envelope (new `seq`, `iat`, `exp`) as often as it needs to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson
from securesystemslib.signer import Key, Signer

from attestation.envelope import EnvelopeError, parse, seal

PREFIX = "fleet/v1"
PAYLOAD_TYPE = "application/vnd.fleet.message+json"
CONTROLLER = "controller"
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CLOCK_SKEW_S = 300.0
COMMAND_TTL_S = 600.0
PRESENCE_TTL_S = 30 * 86400.0
_DEVICE_ID = re.compile(r"^[a-z0-9]{8,40}$")
_COMMAND_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class Channel(StrEnum):
    CMD = "cmd"
    STATUS = "status"
    EVIDENCE = "evidence"
    TELEMETRY = "telemetry"
    PRESENCE = "presence"


DEVICE_CHANNELS = frozenset({Channel.STATUS, Channel.EVIDENCE, Channel.TELEMETRY, Channel.PRESENCE})


class MessageType(StrEnum):
    # controller -> device, on `cmd`
    DEPLOY = "deploy"
    ROLLBACK = "rollback"
    PING = "ping"
    CONFIG = "config"
    ATTEST = "attest"
    # device -> controller
    HELLO = "hello"
    STATUS = "status"
    SECURITY = "security-event"
    PRESENCE = "presence"
    TELEMETRY = "telemetry"


COMMAND_TYPES = frozenset(
    {
        MessageType.DEPLOY,
        MessageType.ROLLBACK,
        MessageType.PING,
        MessageType.CONFIG,
        MessageType.ATTEST,
    }
)
TYPES_ON_CHANNEL: dict[Channel, frozenset[MessageType]] = {
    Channel.CMD: COMMAND_TYPES,
    Channel.STATUS: frozenset({MessageType.HELLO, MessageType.STATUS, MessageType.SECURITY}),
    Channel.PRESENCE: frozenset({MessageType.PRESENCE}),
    Channel.EVIDENCE: frozenset(),
    Channel.TELEMETRY: frozenset({MessageType.TELEMETRY}),
}


class CommandState(StrEnum):
    """What a device reports about one command. The last five end it."""

    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    HEALTH_CHECK = "health-check"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REFUSED = "refused"
    ROLLED_BACK = "rolled-back"
    DONE = "done"


TERMINAL_STATES = frozenset(
    {
        CommandState.SUCCEEDED,
        CommandState.FAILED,
        CommandState.REFUSED,
        CommandState.ROLLED_BACK,
        CommandState.DONE,
    }
)


class Refusal(Exception):
    """A message a receiver will not act on; `kind` is the metric label, the text the log line."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_device_id(value: object) -> bool:
    return isinstance(value, str) and _DEVICE_ID.match(value) is not None


def topic(device_id: str, channel: Channel) -> str:
    if not is_device_id(device_id):
        raise ValueError(f"not a device id: {device_id!r}")
    return f"{PREFIX}/d/{device_id}/{channel.value}"


def parse_topic(name: str) -> tuple[str, Channel] | None:
    """(device id, channel) of a fleet topic, or None for anything else."""
    parts = name.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[2] != "d":
        return None
    if not is_device_id(parts[3]):
        return None
    try:
        return parts[3], Channel(parts[4])
    except ValueError:
        return None


def device_subscriptions(
    share_group: str | None = None, channels: Iterable[Channel] = DEVICE_CHANNELS
) -> list[str]:
    """The topic filters the controller subscribes to (every device's `channels`); with
    `share_group`, as shared subscriptions so several controller processes split the devices'
    messages."""
    filters = [f"{PREFIX}/d/+/{channel.value}" for channel in sorted(channels)]
    if share_group:
        return [f"$share/{share_group}/{f}" for f in filters]
    return filters


@dataclass(frozen=True)
class Message:
    iss: str
    aud: str
    seq: int
    iat: float
    exp: float
    type: MessageType
    body: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> bytes:
        document = {
            "iss": self.iss,
            "aud": self.aud,
            "seq": self.seq,
            "iat": self.iat,
            "exp": self.exp,
            "type": self.type.value,
            "body": self.body,
        }
        return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_payload(cls, payload: bytes) -> Message:
        document = _json_object(payload)
        iss, aud, kind = document.get("iss"), document.get("aud"), document.get("type")
        seq, iat, exp = document.get("seq"), document.get("iat"), document.get("exp")
        body = document.get("body")
        if not isinstance(iss, str) or not isinstance(aud, str):
            raise Refusal("malformed", "iss and aud must be strings")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise Refusal("malformed", "seq must be a positive integer")
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            raise Refusal("malformed", "iat and exp must be times in seconds")
        if not _is_time(iat) or not _is_time(exp):
            raise Refusal("malformed", "iat and exp must be times in seconds")
        if not isinstance(body, dict):
            raise Refusal("malformed", "body must be an object")
        if not isinstance(kind, str):
            raise Refusal("malformed", "type must be a string")
        try:
            message_type = MessageType(kind)
        except ValueError:
            raise Refusal("malformed", f"unknown message type {kind!r}") from None
        return cls(iss, aud, seq, float(iat), float(exp), message_type, body)


def seal_message(message: Message, signer: Signer) -> bytes:
    return seal(message.to_payload(), PAYLOAD_TYPE, signer)


def open_message(
    data: bytes,
    *,
    audience: str,
    channel: Channel,
    key_for: Callable[[str], Key | None],
    last_seq: Callable[[str], int],
    now: float,
    topic_sender: str | None = None,
) -> Message:
    """The message in `data`, if every rule in the module docstring holds; `Refusal` if not.

    `key_for(iss)` is the key that sender must have signed with (None: unknown sender);
    `last_seq(iss)` the last seq accepted from it on this stream (0 for none); `topic_sender` the
    device id in the topic the message arrived on, for messages from devices.
    """
    try:
        sealed = parse(data, PAYLOAD_TYPE, MAX_MESSAGE_BYTES)
    except EnvelopeError as exc:
        raise Refusal(exc.kind, f"not a valid envelope: {exc}") from None
    claimed = _json_object(sealed.untrusted_payload).get("iss")
    if not isinstance(claimed, str):
        raise Refusal("malformed", "the payload names no issuer")
    key = key_for(claimed)
    if key is None:
        raise Refusal("unknown-sender", f"no key is known for issuer {claimed[:64]!r}")
    try:
        payload = sealed.open(key)
    except EnvelopeError as exc:
        raise Refusal(exc.kind, f"from {claimed}: {exc}") from None
    message = Message.from_payload(payload)
    if topic_sender is not None and message.iss != topic_sender:
        raise Refusal("spoofed", f"{message.iss} signed a message on {topic_sender}'s topic")
    if message.aud != audience:
        raise Refusal("wrong-audience", f"addressed to {message.aud[:64]!r}, not {audience}")
    if message.type not in TYPES_ON_CHANNEL[channel]:
        raise Refusal("wrong-type", f"a {message.type.value} message is not taken on {channel}")
    if message.iat > now + MAX_CLOCK_SKEW_S:
        raise Refusal("not-yet-valid", f"issued {message.iat - now:.0f} s in the future")
    if message.exp < now:
        raise Refusal("expired", f"expired {now - message.exp:.0f} s ago")
    previous = last_seq(message.iss)
    if message.seq <= previous:
        raise Refusal("replayed", f"seq {message.seq} is not above {previous}")
    return message


def claimed_issuer(data: bytes) -> str | None:
    """The issuer an envelope claims, unverified: only for looking up the key to verify it with."""
    try:
        sealed = parse(data, PAYLOAD_TYPE, MAX_MESSAGE_BYTES)
        claimed = _json_object(sealed.untrusted_payload).get("iss")
    except (EnvelopeError, Refusal):
        return None
    return claimed if isinstance(claimed, str) else None


def command_id(message: Message) -> str:
    """The command id a command or a status names; `Refusal` if it is missing or malformed."""
    value = message.body.get("command_id")
    if not isinstance(value, str) or not _COMMAND_ID.match(value):
        raise Refusal("malformed", f"a {message.type.value} needs a command_id")
    return value


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise Refusal("malformed", "the payload is not JSON") from None
    if not isinstance(document, dict):
        raise Refusal("malformed", "the payload is not a JSON object")
    return document


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
