"""The device's attester: measure the agent, answer the controller's challenge, keep the result.

Rules:
- The agent code is measured with `attestation.manifest` over the packages this agent was
  imported from. The measurement is kept and taken again whenever one of those files changed
  (size, mtime or inode), so a change on disk shows in the next evidence without hashing every
  file for every attestation.
- The effective config is what governs this agent: its owner's policy and run settings
  (`agent.yaml`) and the controller addresses it uses. It goes into the evidence whole, with its
  SHA-256, so the controller can check constraints on it.
- An attestation asks the controller for a fresh challenge, answers it with evidence (nonce,
  device id, agent version and code digest, config, active and previous rune, platform facts,
  boot id) signed by the identity key, and stores the signed result it gets back in
  `attestation.json` (atomically), whatever its status. Both requests are signed by the device
  (`ota.request_auth`).
- The passport is the stored result while it is fresh and affirming: what the device presents
  for rune downloads. Anything else is no passport.
- An unreachable controller is `AttestationUnavailable` (`AttestationUnauthorized` when it does
  not take the device's signature); a refusal is `AttestationRefused` with the controller's
  reason; none of them changes the stored result.
- Evidence comes from an `EvidenceProducer`: `SoftwareEvidence` is the agent measuring itself
  (kind `software`); a TPM 2.0 quote would be another producer behind the same interface
  (docs/attestation.md says how to add one).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import enum
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import urllib3

import attestation
from agent.durable import write_atomically
from agent.policy import AgentPolicy
from agent.runconfig import RunConfig
from agent.slots import SlotRef, Slots
from agent.update import agent_version
from attestation.evidence import Evidence, RuneClaim, config_digest, seal_evidence
from attestation.identity import DeviceIdentity
from attestation.manifest import AGENT_PACKAGES, AgentManifest, manifest_of_tree
from attestation.policy import Status
from ota.request_auth import sign_request

RESULT_FILE = "attestation.json"
CHALLENGE_PATH = "/api/v1/attestation/challenge"
EVIDENCE_PATH = "/api/v1/attestation/evidence"
HTTP_TIMEOUT_S = 15.0
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

Runes = Callable[[], tuple[RuneClaim | None, RuneClaim | None]]


class AttestationFailed(Exception):
    """An attestation that did not produce a result; the text says why."""


class AttestationUnavailable(AttestationFailed):
    """The controller could not be reached or answered with a server error: try again later."""


class AttestationUnauthorized(AttestationUnavailable):
    """The controller did not take the device's signed request (not registered, revoked, or a
    clock far off): nothing to attest until that is fixed."""


class AttestationRefused(AttestationFailed):
    """The controller refused the evidence (or the request); the text is its reason."""


@dataclass(frozen=True)
class StoredResult:
    """The last result: its status, reasons, expiry, and the signed envelope itself."""

    status: Status
    reasons: tuple[str, ...]
    issued_at: float
    expires_at: float
    envelope: bytes
    deploy_age_s: float = 0.0  # how old a result the controller takes for a rune download

    def recent(self, now: float, limit_s: float) -> bool:
        """Affirming and young enough to back a deploy: issued less than `limit_s` ago, and less
        than half the controller's `deploy_age_s`, so it is still taken when the download comes."""
        age = now - self.issued_at
        return self.status is Status.AFFIRMING and age < min(limit_s, self.deploy_age_s / 2)

    def passport(self, now: float) -> str | None:
        """The `Fleet-Attestation` header value, while the result is fresh and affirming."""
        if self.status is not Status.AFFIRMING or not now < self.expires_at:
            return None
        return base64.b64encode(self.envelope).decode()


class AgentCode:
    """The running agent's code measurement, taken again when its files change."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or Path(attestation.__file__).resolve().parent.parent
        self._cached: tuple[tuple[tuple[str, int, int, int], ...], AgentManifest] | None = None

    def manifest(self) -> AgentManifest:
        stamp = self._stamp()
        if self._cached is None or self._cached[0] != stamp:
            self._cached = (stamp, manifest_of_tree(self.root))
        return self._cached[1]

    def _stamp(self) -> tuple[tuple[str, int, int, int], ...]:
        stamps = []
        for name in AGENT_PACKAGES:
            for directory, _, files in os.walk(self.root / name):
                for file in files:
                    path = Path(directory) / file
                    with contextlib.suppress(OSError):
                        info = path.stat()
                        stamps.append((str(path), info.st_size, info.st_mtime_ns, info.st_ino))
        return tuple(sorted(stamps))


class EvidenceProducer(Protocol):
    """Makes the evidence that answers `nonce` (one kind of evidence)."""

    def produce(self, nonce: str) -> Evidence: ...


class SoftwareEvidence:
    """The agent's own measurement, signed by the device's identity key (`kind` `software`)."""

    def __init__(
        self,
        identity: DeviceIdentity,
        agent_version: str,
        config: Callable[[], dict[str, Any]],
        runes: Runes,
        code: AgentCode | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.agent_version = agent_version
        self.config = config
        self.runes = runes
        self.code = code or AgentCode()
        self.clock = clock

    def produce(self, nonce: str) -> Evidence:
        config = self.config()
        active, previous = self.runes()
        return Evidence(
            nonce=nonce,
            device_id=self.identity.device_id,
            agent_version=self.agent_version,
            agent_sha256=self.code.manifest().sha256,
            config=config,
            config_sha256=config_digest(config),
            active=active,
            previous=previous,
            platform=platform_facts(),
            boot_id=boot_id(),
            produced_at=self.clock(),
        )


class Attester:
    """Attests this device to the controller at `server` and keeps the result in `state_dir`."""

    def __init__(
        self,
        state_dir: Path,
        server: str,
        identity: DeviceIdentity,
        producer: EvidenceProducer,
        clock: Callable[[], float] = time.time,
        http: urllib3.PoolManager | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.server = server.rstrip("/")
        self.identity = identity
        self.producer = producer
        self.clock = clock
        self._http = http or urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10.0, read=HTTP_TIMEOUT_S), retries=False
        )

    def attest(self) -> StoredResult:
        """Get a challenge, answer it, store the result and return it."""
        challenge = self._post(CHALLENGE_PATH, None)
        nonce = challenge.get("nonce")
        if not isinstance(nonce, str):
            raise AttestationRefused("the controller's challenge carries no nonce")
        sealed = seal_evidence(self.producer.produce(nonce), self.identity.signer)
        answer = self._post(EVIDENCE_PATH, sealed)
        try:
            result = StoredResult(
                status=Status.from_label(str(answer["status"])),
                reasons=tuple(str(r) for r in answer["reasons"]),
                issued_at=float(answer["issued_at"]),
                expires_at=float(answer["expires_at"]),
                envelope=base64.b64decode(answer["result"], validate=True),
                deploy_age_s=float(answer.get("deploy_age_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise AttestationRefused(f"the controller's answer is not a result ({exc})") from None
        write_atomically(self.state_dir / RESULT_FILE, _stored_json(result))
        return result

    def passport(self) -> str | None:
        stored = stored_attestation(self.state_dir)
        return stored.passport(self.clock()) if stored is not None else None

    def _post(self, path: str, body: bytes | None) -> dict[str, Any]:
        headers = sign_request(
            self.identity.signer, self.identity.device_id, "POST", path, self.clock()
        )
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request("POST", self.server + path, body=body, headers=headers)
        except urllib3.exceptions.HTTPError as exc:
            reason = getattr(exc, "reason", None) or exc
            raise AttestationUnavailable(f"cannot reach the controller ({reason})") from None
        try:
            data = json.loads(response.data)
        except ValueError:
            data = None
        message = data.get("error") if isinstance(data, dict) else None
        if response.status >= 500:
            raise AttestationUnavailable(f"the controller failed: {message or response.status}")
        if response.status == 401:
            raise AttestationUnauthorized(
                "the controller refused this device's signed request (HTTP 401): the device is "
                "not registered, was revoked, or its clock is more than 5 minutes off"
            )
        if response.status >= 400:
            raise AttestationRefused(str(message or f"HTTP {response.status}"))
        if not isinstance(data, dict):
            raise AttestationRefused(f"the controller's answer to {path} is not JSON")
        return data


def stored_attestation(state_dir: Path) -> StoredResult | None:
    """The last result stored in `state_dir`, or None (none yet, or a file that cannot be read)."""
    try:
        data = json.loads((state_dir / RESULT_FILE).read_bytes())
        return StoredResult(
            status=Status.from_label(data["status"]),
            reasons=tuple(data["reasons"]),
            issued_at=float(data["issued_at"]),
            expires_at=float(data["expires_at"]),
            envelope=base64.b64decode(data["envelope"], validate=True),
            deploy_age_s=float(data.get("deploy_age_s", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError, binascii.Error):
        return None


def rune_claims(slots: Slots) -> tuple[RuneClaim | None, RuneClaim | None]:
    """The active and previous runes of `slots`, as evidence names them."""
    state = slots.state()

    def claim(held: SlotRef | None) -> RuneClaim | None:
        if held is None:
            return None
        rune = slots.rune(held.slot)
        return RuneClaim(f"{rune.org}/{rune.name}@{rune.version}", rune.sha256)

    return claim(state.active), claim(state.previous)


def attester_for(
    state_dir: Path,
    server: str,
    *,
    slots: Slots | None = None,
    broker_url: str | None = None,
    clock: Callable[[], float] = time.time,
) -> Attester:
    """The attester of the device in `state_dir`, with its own evidence (`SoftwareEvidence`)."""
    identity = DeviceIdentity.load_or_create(state_dir)
    held = slots or Slots(state_dir)
    producer = SoftwareEvidence(
        identity,
        agent_version(),
        lambda: effective_config(state_dir, server, broker_url),
        lambda: rune_claims(held),
        clock=clock,
    )
    return Attester(state_dir, server, identity, producer, clock=clock)


def effective_config(
    state_dir: Path, server_url: str, broker_url: str | None = None
) -> dict[str, Any]:
    """What governs this agent, as plain JSON (see the module rules)."""
    policy = AgentPolicy.load(state_dir)
    run = RunConfig.load(state_dir)
    config: dict[str, Any] = _plain(
        {
            "policy": {
                "allowed_capabilities": sorted(policy.allowed_capabilities),
                "health_check_calls": policy.health_check_calls,
                "allow_downgrade": policy.allow_downgrade,
                "probation": dataclasses.asdict(policy.probation),
            },
            "run": {
                **dataclasses.asdict(run),
                "input": {"kind": run.input.kind.value, **dataclasses.asdict(run.input)},
            },
            "server_url": server_url,
            "broker_url": broker_url,
        }
    )
    return config


def platform_facts() -> dict[str, str]:
    return {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }


def boot_id() -> str:
    """This boot's id (Linux), or `unknown` where the system has none."""
    with contextlib.suppress(OSError):
        value = BOOT_ID.read_text().strip()
        if value:
            return value[:64]
    return "unknown"


def _plain(value: Any) -> Any:
    """`value` as JSON types: paths and enums as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _stored_json(result: StoredResult) -> bytes:
    return json.dumps(
        {
            "status": result.status.label,
            "reasons": list(result.reasons),
            "issued_at": result.issued_at,
            "expires_at": result.expires_at,
            "envelope": base64.b64encode(result.envelope).decode(),
            "deploy_age_s": result.deploy_age_s,
        },
        sort_keys=True,
    ).encode()
