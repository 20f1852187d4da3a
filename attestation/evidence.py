"""Evidence: what a device claims about itself when it answers a challenge, signed by its key.

Rules:
- Evidence answers exactly one challenge: it carries the verifier's nonce (`NONCE_HEX_MIN` to
  `NONCE_HEX_MAX` lowercase hex digits, at least 128 bits) and the id of the device it is about.
- It is a DSSE envelope of `PAYLOAD_TYPE` (`attestation.envelope`) signed by the device's identity
  key. `open_evidence` needs that key up front and refuses a signature by any other key; the
  payload is not read before the signature verified.
- The payload is a JSON object of format `FORMAT` with exactly the fields of `Evidence`; anything
  missing, of the wrong type, or extra is refused naming the field (`EvidenceError`).
- `config_sha256` is the device's digest of its config (`config_digest`: canonical JSON). The
  verifier does not compute it again: the signature already binds the config to the device, and
  constraints are checked on the config itself. It is there to compare configs across results.
- `kind` names the evidence producer: `software` is the agent measuring itself and signing with
  its identity key; another producer (a TPM 2.0 quote) is another kind, appraised by its own
  checks (docs/attestation.md says how to add one).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
from securesystemslib.signer import Key, Signer

from attestation.envelope import EnvelopeError, parse, seal

FORMAT = "fleet-evidence/1"
PAYLOAD_TYPE = "application/vnd.fleet.evidence+json"
SOFTWARE = "software"
NONCE_HEX_MIN = 32
NONCE_HEX_MAX = 128
MAX_EVIDENCE_BYTES = 64 * 1024
_NONCE = re.compile(rf"^[0-9a-f]{{{NONCE_HEX_MIN},{NONCE_HEX_MAX}}}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = frozenset(
    {
        "format",
        "kind",
        "nonce",
        "device_id",
        "agent_version",
        "agent_sha256",
        "config",
        "config_sha256",
        "active",
        "previous",
        "platform",
        "boot_id",
        "produced_at",
    }
)


class EvidenceError(Exception):
    """Evidence that cannot be accepted; `kind` is a short reason, the text says what was wrong."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RuneClaim:
    """A rune the device says it holds: its ref (`org/name@version`) and SHA-256."""

    ref: str
    sha256: str

    def to_json(self) -> dict[str, str]:
        return {"ref": self.ref, "sha256": self.sha256}


@dataclass(frozen=True)
class Evidence:
    nonce: str
    device_id: str
    agent_version: str
    agent_sha256: str
    config: dict[str, Any] = field(repr=False)
    config_sha256: str
    active: RuneClaim | None
    previous: RuneClaim | None
    platform: dict[str, str]
    boot_id: str
    produced_at: float
    kind: str = SOFTWARE

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "nonce": self.nonce,
            "device_id": self.device_id,
            "agent_version": self.agent_version,
            "agent_sha256": self.agent_sha256,
            "config": self.config,
            "config_sha256": self.config_sha256,
            "active": self.active.to_json() if self.active else None,
            "previous": self.previous.to_json() if self.previous else None,
            "platform": self.platform,
            "boot_id": self.boot_id,
            "produced_at": self.produced_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Evidence:
        if not isinstance(data, dict):
            raise EvidenceError("malformed", "evidence is not a JSON object")
        if data.get("format") != FORMAT:
            raise EvidenceError("malformed", f"evidence is not of format {FORMAT}")
        if data.keys() != _FIELDS:
            missing, extra = sorted(_FIELDS - set(data)), sorted(set(data) - _FIELDS)
            what = [f"missing {', '.join(missing)}"] if missing else []
            what += [f"unknown {', '.join(map(str, extra))}"] if extra else []
            raise EvidenceError("malformed", f"evidence fields: {'; '.join(what)}")
        config = data["config"]
        if not isinstance(config, dict):
            raise EvidenceError("malformed", "evidence config must be an object")
        platform = data["platform"]
        if not isinstance(platform, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in platform.items()
        ):
            raise EvidenceError("malformed", "evidence platform must map names to strings")
        produced_at = data["produced_at"]
        if (
            not isinstance(produced_at, int | float)
            or isinstance(produced_at, bool)
            or not math.isfinite(produced_at)
        ):
            raise EvidenceError("malformed", "evidence produced_at must be a time in seconds")
        return cls(
            nonce=_text(data, "nonce", _NONCE, "32 to 128 lowercase hex digits"),
            device_id=_text(data, "device_id"),
            agent_version=_text(data, "agent_version"),
            agent_sha256=_text(data, "agent_sha256", _SHA256, "a SHA-256 in hex"),
            config=config,
            config_sha256=_text(data, "config_sha256", _SHA256, "a SHA-256 in hex"),
            active=_rune(data, "active"),
            previous=_rune(data, "previous"),
            platform=dict(platform),
            boot_id=_text(data, "boot_id"),
            produced_at=float(produced_at),
            kind=_text(data, "kind"),
        )


def config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a config as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def seal_evidence(evidence: Evidence, signer: Signer) -> bytes:
    payload = orjson.dumps(evidence.to_json(), option=orjson.OPT_SORT_KEYS)
    return seal(payload, PAYLOAD_TYPE, signer)


def open_evidence(data: bytes, key: Key) -> Evidence:
    """The evidence in `data` if `key` signed it; `EvidenceError` naming what is wrong if not."""
    try:
        payload = parse(data, PAYLOAD_TYPE, MAX_EVIDENCE_BYTES).open(key)
    except EnvelopeError as exc:
        raise EvidenceError(exc.kind, f"evidence envelope: {exc}") from None
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise EvidenceError("malformed", "the evidence payload is not JSON") from None
    return Evidence.from_json(document)


def _text(
    data: dict[str, Any], name: str, pattern: re.Pattern[str] | None = None, what: str = ""
) -> str:
    value = data[name]
    if not isinstance(value, str) or not value or len(value) > 256:
        raise EvidenceError("malformed", f"evidence {name} must be a non-empty string")
    if pattern is not None and not pattern.match(value):
        raise EvidenceError("malformed", f"evidence {name} must be {what}")
    return value


def _rune(data: dict[str, Any], name: str) -> RuneClaim | None:
    value = data[name]
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"ref", "sha256"}:
        raise EvidenceError("malformed", f"evidence {name} must be null or {{ref, sha256}}")
    return RuneClaim(_text(value, "ref"), _text(value, "sha256", _SHA256, "a SHA-256 in hex"))
