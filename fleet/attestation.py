"""The controller's side of device attestation: challenges, appraisal, results and quarantine.

The appraisal itself is `attestation.verifier` (sans-I/O); this module keeps what it needs and
what it leads to in the database. The HTTP layer is `fleet.api.attestation`.

Rules:
- A challenge is `NONCE_BYTES` random bytes (hex) for one enrolled device, stored with its expiry
  (`CHALLENGE_TTL`). Evidence is appraised only for a stored nonce of that device that has not
  expired and was not used, and using it is one conditional `UPDATE`, so a nonce is answered once,
  whatever restarts or replicas come between. Evidence for a used nonce is a replay, for another
  device's, an unknown or an expired nonce a refusal (`AttestationRefused`): counted, logged as
  a security event, and nothing about the device changes.
- Evidence must verify with the device's enrolled key before its nonce is even looked up;
  otherwise it is refused the same way and yields no result.
- The reference values are the agent releases and config constraints registered
  (`AttestationReference`), the runes published now (not revoked) and every rune ever admitted.
  They are read again at most `REFERENCE_TTL_S` after they were last read, and at once after this
  controller changed them (`references_changed`: a rune pushed or revoked, a reference added or
  removed); another replica's change is seen within `REFERENCE_TTL_S`.
- Expired challenges are deleted by the schedule, every `CHECK_INTERVAL_S`.
- Every result is recorded on the device (status, reasons, when it was issued and until when it
  is fresh) and handed back signed: the device's passport for rune downloads.
- A `contraindicated` result quarantines the device (`quarantined_at`, with the reasons); an
  `affirming` one releases a quarantined device; `release` is an admin's manual release. A
  `warning` changes neither.
- A passport (the `ota.request_auth.PASSPORT_HEADER` of a rune download) is accepted for a device
  when it is a result signed by this controller's attestation key, for that device, fresh,
  `affirming`, issued at most `deploy_age` ago (every deploy is backed by a recent attestation),
  and the device is not quarantined now (a passport issued before a quarantine does not outlive
  it).
- Devices are asked to attest (an `attest` command, `request_due`) when they connect without a
  result younger than the fleet's `attestation_interval`, and on that interval after; a device
  with an `attest` command still on its way is not asked again. A device also attests by itself
  before each deploy.
- The controller registers its own installed agent code as the reference for its own version
  (`register_own_release`), so a fleet whose agents run the controller's release attests out of
  the box; any other release is registered with `fleetctl attestation reference add`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from securesystemslib.signer import Key, Signer
from tortoise.expressions import Q

import attestation
from attestation.evidence import EvidenceError, open_evidence
from attestation.keys import generate_key_file, load_key_file
from attestation.manifest import manifest_of_tree
from attestation.policy import Status
from attestation.verifier import (
    AttestationResult,
    Challenge,
    ReferenceValues,
    ResultError,
    Verifier,
    open_result,
)
from fleet.db.models import AttestationNonce, AttestationReference, Command, Device, Rune
from fleet.logs import log
from fleet.outbox import TERMINAL, CommandRequest, Outbox
from ota.protocol import MessageType

NONCE_BYTES = 16
CHALLENGE_TTL = timedelta(minutes=2)
ATTEST_DEADLINE = timedelta(minutes=10)
CHECK_INTERVAL_S = 30.0
REFERENCE_TTL_S = 2.0
AGENT = "agent"
CONFIG = "config"
KINDS = (AGENT, CONFIG)


class AttestationRefused(Exception):
    """Evidence that yields no result: `status` for the HTTP answer, `kind` for the metric."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class AttestationMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.results = Counter(
            "fleet_attestation_results_total",
            "Attestation results issued, by status",
            ["status"],
            registry=registry,
        )
        self.refused = Counter(
            "fleet_attestation_refused_total",
            "Evidence refused without a result: a replayed or unknown nonce, a bad signature",
            ["kind"],
            registry=registry,
        )
        self.quarantined = Counter(
            "fleet_devices_quarantined_total",
            "Devices quarantined by a contraindicated attestation result",
            registry=registry,
        )


@dataclass
class AttestationService:
    signer: Signer
    verifier: Verifier
    metrics: AttestationMetrics
    deploy_age: timedelta  # how old a result a rune download may present
    # The reference values read last, and when (monotonic): read again after
    # `REFERENCE_TTL_S`, or at once after a change this controller made (`references_changed`).
    _references: tuple[float, ReferenceValues] | None = None

    @classmethod
    def open(
        cls,
        key_file: Path,
        fleet_name: str,
        result_ttl: timedelta,
        deploy_age: timedelta,
        registry: CollectorRegistry,
    ) -> AttestationService:
        """The service with the fleet's attestation key, made on first use."""
        signer = load_key_file(key_file) if key_file.exists() else generate_key_file(key_file)
        verifier = Verifier(signer, f"fleet {fleet_name}", result_ttl.total_seconds())
        return cls(signer, verifier, AttestationMetrics(registry), deploy_age)

    @property
    def public_key(self) -> Key:
        return self.signer.public_key

    # Challenges and evidence.

    async def challenge(self, device_id: str, now: datetime) -> AttestationNonce:
        return await AttestationNonce.create(
            nonce=secrets.token_hex(NONCE_BYTES),
            device_id=device_id,
            expires_at=now + CHALLENGE_TTL,
        )

    async def submit(
        self, device_id: str, device_key: Key, data: bytes, now: datetime
    ) -> tuple[AttestationResult, bytes]:
        """Appraise evidence from `device_id` and record the result; `AttestationRefused` when the
        evidence yields none (see the module rules)."""
        try:
            evidence = open_evidence(data, device_key)
            await self._use(evidence.nonce, device_id, now)
            reference = await self.reference_values()
            challenge = Challenge(evidence.nonce, device_id)
            digest = hashlib.sha256(data).hexdigest()
            result, sealed = self.verifier.judge(
                evidence, digest, challenge, reference, now.timestamp()
            )
        except EvidenceError as exc:
            self._refuse(device_id, exc.kind, str(exc))
            raise AttestationRefused(400, exc.kind, str(exc)) from None
        except AttestationRefused as exc:
            self._refuse(device_id, exc.kind, exc.message)
            raise
        await self._record(device_id, result, now)
        self.metrics.results.labels(result.status.label).inc()
        log(
            "attestation.result"
            if result.status is Status.AFFIRMING
            else "security.attestation_failed",  # also a record in the audit log
            logging.INFO if result.status is Status.AFFIRMING else logging.WARNING,
            device=device_id,
            status=result.status.label,
            reasons="; ".join(result.reasons)[:500],
        )
        return result, sealed

    async def _use(self, nonce: str, device_id: str, now: datetime) -> None:
        used = await AttestationNonce.filter(
            nonce=nonce, device_id=device_id, used_at=None, expires_at__gt=now
        ).update(used_at=now)
        if used:
            return
        row = await AttestationNonce.get_or_none(nonce=nonce)
        if row is None or row.device_id != device_id:
            raise AttestationRefused(
                409, "unknown-nonce", "the evidence answers no challenge of this device"
            )
        if row.used_at is not None:
            raise AttestationRefused(
                409, "replayed", "the evidence answers a challenge already answered"
            )
        raise AttestationRefused(409, "expired-nonce", "the challenge expired; ask for a new one")

    async def _record(self, device_id: str, result: AttestationResult, now: datetime) -> None:
        fields: dict[str, Any] = {
            "attestation_status": result.status.label,
            "attestation_reasons": list(result.reasons),
            "attested_at": now,
            "attestation_expires_at": now + timedelta(seconds=result.expires_at - result.issued_at),
        }
        if result.status is Status.CONTRAINDICATED:
            reason = "; ".join(result.reasons)[:2000]
            quarantined = await Device.filter(id=device_id, quarantined_at=None).update(
                **fields, quarantined_at=now, quarantine_reason=reason
            )
            if quarantined:
                self.metrics.quarantined.inc()
                log("security.device_quarantined", logging.WARNING, device=device_id, reason=reason)
                return
        elif result.status is Status.AFFIRMING:
            released = await Device.filter(id=device_id, quarantined_at__not_isnull=True).update(
                **fields, quarantined_at=None, quarantine_reason=None
            )
            if released:
                log("device.released", device=device_id, by="an affirming attestation")
                return
        await Device.filter(id=device_id).update(**fields)

    def _refuse(self, device_id: str, kind: str, reason: str) -> None:
        self.metrics.refused.labels(kind).inc()
        log(
            "security.evidence_refused",
            logging.WARNING,
            device=device_id,
            kind=kind,
            reason=reason[:300],
        )

    async def reference_values(self) -> ReferenceValues:
        cached, now = self._references, time.monotonic()
        if cached is None or now - cached[0] > REFERENCE_TTL_S:
            cached = (now, await reference_values())
            self._references = cached
        return cached[1]

    def references_changed(self) -> None:
        """A rune or a reference value changed: read them again for the next appraisal."""
        self._references = None

    # Passports.

    def passport_refusal(self, header: str | None, device: Device, now: datetime) -> str | None:
        """Why `device` may not download a rune with this passport, or None when it may."""
        if device.quarantined_at is not None:
            return f"the device is quarantined: {device.quarantine_reason or 'no reason recorded'}"
        if not header:
            return "no attestation result was presented (attest first)"
        try:
            data = base64.b64decode(header, validate=True)
            result = open_result(data, self.public_key, device_id=device.id, now=now.timestamp())
        except (binascii.Error, ValueError):
            return "the attestation header is not base64"
        except ResultError as exc:
            return f"the attestation result is refused ({exc.kind}): {exc}"
        if result.status is not Status.AFFIRMING:
            return f"the attestation result is {result.status.label}: {'; '.join(result.reasons)}"
        age = now.timestamp() - result.issued_at
        if age > self.deploy_age.total_seconds():
            return (
                f"the attestation result is {age / 60:.0f} min old; a rune needs one at most "
                f"{self.deploy_age.total_seconds() / 60:g} min old (attest again)"
            )
        return None


# Asking devices to attest.


async def request_due(
    outbox: Outbox, now: datetime, interval: timedelta, device_ids: list[str] | None = None
) -> int:
    """Send `attest` to every online enrolled device (of `device_ids`, if given) whose last
    result is older than `interval` or missing, unless one is already on its way; how many."""
    query = Device.filter(state="enrolled", online=True).filter(
        Q(attested_at=None) | Q(attested_at__lt=now - interval)
    )
    if device_ids is not None:
        query = query.filter(id__in=device_ids)
    due = [str(device_id) for device_id in await query.values_list("id", flat=True)]
    if not due:
        return 0
    asked = {
        str(device_id)
        for device_id in await Command.filter(
            device_id__in=due, type=MessageType.ATTEST.value, state__not_in=sorted(TERMINAL)
        ).values_list("device_id", flat=True)
    }
    requests = [
        CommandRequest(device_id, MessageType.ATTEST, {}, "attestation schedule", ATTEST_DEADLINE)
        for device_id in due
        if device_id not in asked
    ]
    if not requests:
        return 0
    made, _ = await outbox.enqueue_many(requests)
    await outbox.send_many(made)
    return len(made)


class AttestationSchedule:
    """The asking, as one task: every `CHECK_INTERVAL_S`, and for a device that says `hello`."""

    def __init__(self, outbox: Outbox, interval: timedelta, clock: Callable[[], datetime]) -> None:
        self.outbox = outbox
        self.interval = interval
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    async def hello(self, device_id: str) -> None:
        await request_due(self.outbox, self.clock(), self.interval, [device_id])

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="attestation-schedule")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            try:
                now = self.clock()
                await AttestationNonce.filter(expires_at__lt=now - CHALLENGE_TTL).delete()
                asked = await request_due(self.outbox, now, self.interval)
            except Exception as exc:  # the database may be away for a moment
                log("attestation.schedule_failed", logging.ERROR, error=repr(exc))
                continue
            if asked:
                log("attestation.requested", devices=asked)


# Reference values.


async def reference_values() -> ReferenceValues:
    agents: dict[str, set[str]] = {}
    config: dict[str, Any] = {}
    for kind, name, value in await AttestationReference.all().values_list("kind", "name", "value"):
        if kind == AGENT:
            agents.setdefault(str(name), set()).add(str(value))
        elif kind == CONFIG:
            config[str(name)] = json.loads(str(value))
    current, known = set(), set()
    for sha256, revoked_at in await Rune.all().values_list("sha256", "revoked_at"):
        known.add(str(sha256))
        if revoked_at is None:
            current.add(str(sha256))
    return ReferenceValues(
        agent={version: frozenset(digests) for version, digests in agents.items()},
        runes_current=frozenset(current),
        runes_known=frozenset(known),
        config=config,
    )


async def add_reference(
    kind: str, name: str, value: str, source: str, created_by: str
) -> tuple[AttestationReference, bool]:
    """Register a reference value (a config constraint replaces the path's earlier one); the
    row and whether it is new."""
    if kind == CONFIG:
        existing = await AttestationReference.get_or_none(kind=CONFIG, name=name)
        if existing is not None and existing.value != value:
            await existing.delete()
    return await AttestationReference.get_or_create(
        kind=kind,
        name=name,
        value=value,
        defaults={"source": source[:255], "created_by": created_by[:64]},
    )


async def register_own_release(version: str) -> None:
    """This controller's installed agent code as the reference for its own agent version."""
    root = Path(attestation.__file__).resolve().parent.parent  # beside it: agent, ota
    digest = manifest_of_tree(root).sha256
    _, created = await add_reference(
        AGENT, version, digest, f"controller install ({root})", "controller"
    )
    if created:
        log("attestation.reference_added", kind=AGENT, name=version, value=digest, by="controller")
