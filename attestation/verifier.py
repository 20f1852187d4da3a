"""The verifier: appraise a device's evidence against reference values, sign the result.

Sans-I/O: the evidence, the device's key, the challenge it answers, the reference values and the
clock come in; a signed, expiring attestation result goes out. Which nonces were issued or used,
where the reference values are kept and what a result leads to is the controller's business
(`fleet.attestation`).

Rules:
- Evidence is appraised only once its envelope verified with the key of the device it is about
  (`attestation.evidence.open_evidence`); a bad signature, another device's key or a malformed
  payload is an `EvidenceError` and yields no result at all.
- Each evidence kind has its policy (`POLICIES`, `software` for the agent's own evidence); a kind
  without one is contraindicated. The `software` policy is `AllOf` the checks below, each a small
  object with its reasons:
  - `AnswersTheChallenge`: the nonce and device id are the challenge's (contraindicated if not);
  - `AgentIsARelease`: the agent code's manifest digest is a reference value for the agent
    version it reports (contraindicated if that version has references and none matches; a
    warning if the version has none);
  - `RunesArePublished`: the active rune is a current target (a warning if it is a rune this fleet
    admitted but no longer publishes; contraindicated if it never admitted it); the previous one,
    the rollback target, was admitted at some time (a warning if not);
  - `ConfigMeetsConstraints`: every constrained setting (a dot path into the evidence's config)
    has its required value (a warning for each that has not);
  - `ProducedRecently`: the evidence was produced within `MAX_CLOCK_SKEW_S` of the verifier's
    clock (a warning otherwise: the device's clock is off).
- The result carries the worst status and every reason that was not affirming (or what was
  affirmed), the nonce and the SHA-256 of the evidence it judged, and expires `result_ttl_s`
  after it was issued. It is a DSSE envelope of `RESULT_PAYLOAD_TYPE` signed by the verifier's
  key; `open_result` accepts it only with that key, for the device named, and while fresh.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from securesystemslib.signer import Key, Signer

from attestation.envelope import EnvelopeError, parse, seal
from attestation.evidence import SOFTWARE, Evidence, RuneClaim, open_evidence
from attestation.policy import AllOf, Policy, Status, Verdict, worst_of

RESULT_FORMAT = "fleet-attestation-result/1"
RESULT_PAYLOAD_TYPE = "application/vnd.fleet.attestation-result+json"
MAX_RESULT_BYTES = 64 * 1024
MAX_CLOCK_SKEW_S = 300.0


class ResultError(Exception):
    """An attestation result that cannot be relied on; `kind` is short, the text says why."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Challenge:
    """The nonce the verifier issued, and the device it issued it to."""

    nonce: str
    device_id: str


@dataclass(frozen=True)
class ReferenceValues:
    """What the evidence is compared with."""

    agent: Mapping[str, frozenset[str]] = field(default_factory=dict)  # version -> digests
    runes_current: frozenset[str] = frozenset()  # SHA-256 of the runes published now
    runes_known: frozenset[str] = frozenset()  # SHA-256 of every rune the fleet admitted
    config: Mapping[str, Any] = field(default_factory=dict)  # dot path -> required value


@dataclass(frozen=True)
class Appraisal:
    """What one appraisal looks at: a policy's subject."""

    evidence: Evidence
    challenge: Challenge
    reference: ReferenceValues
    now: float


_ANSWERS = Verdict.passed("the evidence answers this challenge")
_NO_CONSTRAINTS = Verdict.passed("no config constraints")
_CLOCK_RIGHT = Verdict.passed("the device's clock is right")
_NO_ACTIVE = Verdict.passed("no active rune")
_NO_PREVIOUS = Verdict.passed("no previous rune")
_PREVIOUS_ADMITTED = Verdict.passed("the previous rune was admitted here")


@dataclass(frozen=True)
class AnswersTheChallenge:
    def check(self, appraisal: Appraisal) -> Verdict:
        evidence, challenge = appraisal.evidence, appraisal.challenge
        if evidence.device_id != challenge.device_id:
            return Verdict.failed(
                f"the evidence is about {evidence.device_id}, not {challenge.device_id}"
            )
        if evidence.nonce != challenge.nonce:
            return Verdict.failed("the evidence answers another challenge (its nonce differs)")
        return _ANSWERS


@dataclass(frozen=True)
class AgentIsARelease:
    def check(self, appraisal: Appraisal) -> Verdict:
        evidence = appraisal.evidence
        version, digest = evidence.agent_version, evidence.agent_sha256
        allowed = appraisal.reference.agent.get(version)
        if not allowed:
            return Verdict.warning(
                f"no reference values for agent {version} (register its release with "
                "`fleetctl attestation reference add`)"
            )
        if digest not in allowed:
            return Verdict.failed(
                f"the agent code differs from every release of agent {version} "
                f"(its manifest digest is {digest[:16]}...)"
            )
        return Verdict.passed(f"the agent code is release {version}")


@dataclass(frozen=True)
class RunesArePublished:
    def check(self, appraisal: Appraisal) -> Verdict:
        evidence, reference = appraisal.evidence, appraisal.reference
        return worst_of(
            [_active(evidence.active, reference), _previous(evidence.previous, reference)]
        )


def _active(rune: RuneClaim | None, reference: ReferenceValues) -> Verdict:
    if rune is None:
        return _NO_ACTIVE
    if rune.sha256 in reference.runes_current:
        return Verdict.passed(f"the active rune {rune.ref} is published")
    if rune.sha256 in reference.runes_known:
        return Verdict.warning(f"the active rune {rune.ref} is no longer published")
    return Verdict.failed(
        f"the active rune {rune.ref} ({rune.sha256[:16]}...) was never admitted by this fleet"
    )


def _previous(rune: RuneClaim | None, reference: ReferenceValues) -> Verdict:
    """The rollback target: not running, and kept only while its target is published."""
    if rune is None:
        return _NO_PREVIOUS
    if rune.sha256 in reference.runes_known:
        return _PREVIOUS_ADMITTED
    return Verdict.warning(f"the previous rune {rune.ref} was never admitted here")


@dataclass(frozen=True)
class ConfigMeetsConstraints:
    def check(self, appraisal: Appraisal) -> Verdict:
        constraints = appraisal.reference.config
        if not constraints:
            return _NO_CONSTRAINTS
        wrong = []
        for path, required in sorted(constraints.items()):
            actual = _lookup(appraisal.evidence.config, path)
            if actual != required:
                shown = "unset" if actual is _MISSING else json.dumps(actual)
                wrong.append(f"config {path} is {shown}; the fleet requires {json.dumps(required)}")
        if wrong:
            return Verdict(Status.WARNING, tuple(wrong))
        return Verdict.passed(f"the config meets {len(constraints)} constraint(s)")


@dataclass(frozen=True)
class ProducedRecently:
    def check(self, appraisal: Appraisal) -> Verdict:
        skew = appraisal.evidence.produced_at - appraisal.now
        if abs(skew) > MAX_CLOCK_SKEW_S:
            direction = "ahead" if skew > 0 else "behind"
            return Verdict.warning(f"the device's clock is {abs(skew):.0f} s {direction}")
        return _CLOCK_RIGHT


SOFTWARE_POLICY: AllOf[Appraisal] = AllOf(
    AnswersTheChallenge(),
    AgentIsARelease(),
    RunesArePublished(),
    ConfigMeetsConstraints(),
    ProducedRecently(),
)
POLICIES: Mapping[str, Policy[Appraisal]] = {SOFTWARE: SOFTWARE_POLICY}


@dataclass(frozen=True)
class AttestationResult:
    device_id: str
    status: Status
    reasons: tuple[str, ...]
    issued_at: float
    expires_at: float
    nonce: str
    evidence_sha256: str
    agent_version: str
    verifier: str

    def fresh(self, now: float) -> bool:
        return self.issued_at - MAX_CLOCK_SKEW_S <= now < self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RESULT_FORMAT,
            "device_id": self.device_id,
            "status": self.status.label,
            "reasons": list(self.reasons),
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "nonce": self.nonce,
            "evidence_sha256": self.evidence_sha256,
            "agent_version": self.agent_version,
            "verifier": self.verifier,
        }

    @classmethod
    def from_json(cls, data: Any) -> AttestationResult:
        try:
            if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
                raise ValueError(f"not of format {RESULT_FORMAT}")
            reasons = data["reasons"]
            if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
                raise ValueError("reasons must be a list of strings")
            issued, expires = data["issued_at"], data["expires_at"]
            if not all(_is_time(t) for t in (issued, expires)):
                raise ValueError("issued_at and expires_at must be times in seconds")
            texts = [data[k] for k in ("device_id", "nonce", "evidence_sha256", "verifier")]
            if not all(isinstance(t, str) for t in [*texts, data["agent_version"]]):
                raise ValueError("device_id, nonce, evidence_sha256, agent_version and verifier")
            return cls(
                device_id=data["device_id"],
                status=Status.from_label(str(data["status"])),
                reasons=tuple(reasons),
                issued_at=float(issued),
                expires_at=float(expires),
                nonce=data["nonce"],
                evidence_sha256=data["evidence_sha256"],
                agent_version=data["agent_version"],
                verifier=data["verifier"],
            )
        except (KeyError, ValueError) as exc:
            raise ResultError("malformed", f"not an attestation result: {exc}") from None


class Verifier:
    """Appraises evidence and signs results with `signer` (the controller's attestation key)."""

    def __init__(
        self,
        signer: Signer,
        name: str,
        result_ttl_s: float,
        policies: Mapping[str, Policy[Appraisal]] = POLICIES,
    ) -> None:
        if result_ttl_s <= 0:
            raise ValueError("an attestation result must be valid for some time")
        self.signer = signer
        self.name = name
        self.result_ttl_s = result_ttl_s
        self.policies = policies

    def appraise(
        self,
        data: bytes,
        device_key: Key,
        challenge: Challenge,
        reference: ReferenceValues,
        now: float,
    ) -> tuple[AttestationResult, bytes]:
        """The result for the evidence envelope `data`, and the result signed; `EvidenceError`
        (no result) when the envelope is not the device's or is malformed."""
        evidence = open_evidence(data, device_key)
        return self.judge(evidence, hashlib.sha256(data).hexdigest(), challenge, reference, now)

    def judge(
        self,
        evidence: Evidence,
        evidence_sha256: str,
        challenge: Challenge,
        reference: ReferenceValues,
        now: float,
    ) -> tuple[AttestationResult, bytes]:
        """The result for evidence already opened with its device's key, and the result signed."""
        policy = self.policies.get(evidence.kind)
        appraisal = Appraisal(evidence, challenge, reference, now)
        verdict = (
            policy.check(appraisal)
            if policy is not None
            else Verdict.failed(f"this verifier cannot appraise {evidence.kind} evidence")
        )
        result = AttestationResult(
            device_id=challenge.device_id,
            status=verdict.status,
            reasons=verdict.reasons,
            issued_at=now,
            expires_at=now + self.result_ttl_s,
            nonce=challenge.nonce,
            evidence_sha256=evidence_sha256,
            agent_version=evidence.agent_version,
            verifier=self.name,
        )
        return result, seal_result(result, self.signer)


def seal_result(result: AttestationResult, signer: Signer) -> bytes:
    payload = orjson.dumps(result.to_json())
    return seal(payload, RESULT_PAYLOAD_TYPE, signer)


def open_result(data: bytes, key: Key, *, device_id: str, now: float) -> AttestationResult:
    """The result in `data` if `key` signed it for `device_id` and it is fresh at `now`."""
    try:
        payload = parse(data, RESULT_PAYLOAD_TYPE, MAX_RESULT_BYTES).open(key)
    except EnvelopeError as exc:
        kind = "not-the-verifier" if exc.kind in ("unknown-key", "bad-signature") else exc.kind
        raise ResultError(kind, f"attestation result: {exc}") from None
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ResultError("malformed", "the attestation result is not JSON") from None
    result = AttestationResult.from_json(document)
    if result.device_id != device_id:
        raise ResultError("other-device", f"the attestation result is for {result.device_id}")
    if not result.fresh(now):
        raise ResultError("expired", "the attestation result has expired; attest again")
    return result


_MISSING = object()


def _lookup(config: Mapping[str, Any], path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _is_time(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
