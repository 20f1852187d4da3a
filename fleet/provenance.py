"""Rune provenance on the controller: each org's admission policy, and checking a rune against it.

Rules:
- An org's policy (`AdmissionPolicy`; an org without one has the default: nothing required, no
  keys) names the publisher keys whose signed in-toto statements it accepts, the keys it revoked,
  the Sigstore identities (a certificate identity and its OIDC issuer) it accepts, the trusted
  root those are verified against (`production`, `staging`, or a trusted root's JSON; always
  offline), and whether a rune without provenance is refused.
- A rune comes with a signed statement (`.intoto.jsonl`), a Sigstore bundle, or neither. The
  checks are policies with reasons (`attestation.policy`): `SignedStatement` (the statement's
  signature by a publisher key of the org that is not revoked, its subject the rune's SHA-256:
  `attestation.provenance.verify_statement`), `SigstoreBundle` (the bundle verifies offline for
  the rune's bytes against the trusted root, for any one accepted identity: an `AnyOf` of
  `sigstore.verify.policy.Identity`), and `NothingRequired` for a rune with neither. Whatever
  is given must verify; a refusal names every reason and nothing is stored or published.
- What a rune was admitted with is published beside it as a TUF target
  (`ota.targets.provenance_target_path`), and the org's accepted publisher keys as the target
  `publishers_target_path` (re-published whenever the policy changes), so devices check the
  statement against keys TUF vouches for.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from securesystemslib.signer import Key, SSlibKey

from attestation.policy import AllOf, AnyOf, Policy, Verdict
from attestation.provenance import ProvenanceError, publishers_document, verify_statement
from fleet.db.models import AdmissionPolicy
from fleet.logs import log

TRUSTED_ROOTS = ("production", "staging")
DSSE = "dsse"
SIGSTORE = "sigstore"


class PolicyError(ValueError):
    """A policy change that cannot be made; the text says what is wrong."""


@dataclass(frozen=True)
class Evidence:
    """A rune and the provenance it was pushed with."""

    rune: bytes
    sha256: str
    statement: bytes | None = None
    bundle: bytes | None = None


@dataclass
class OrgPolicy:
    org: str
    require_provenance: bool = False
    publisher_keys: dict[str, tuple[str, Key]] = field(default_factory=dict)  # keyid -> (name, key)
    revoked_keys: frozenset[str] = frozenset()
    sigstore_identities: tuple[tuple[str, str], ...] = ()  # (identity, issuer)
    trusted_root: str = "production"

    def to_json(self) -> dict[str, Any]:
        return {
            "org": self.org,
            "require_provenance": self.require_provenance,
            "publisher_keys": [
                {"keyid": keyid, "name": name, "public": key.keyval.get("public", "")}
                for keyid, (name, key) in sorted(self.publisher_keys.items())
            ],
            "revoked_keys": sorted(self.revoked_keys),
            "sigstore_identities": [
                {"identity": identity, "issuer": issuer}
                for identity, issuer in self.sigstore_identities
            ],
            "trusted_root": self.trusted_root
            if self.trusted_root in TRUSTED_ROOTS
            else "custom (file)",
        }

    def publishers_document(self) -> bytes:
        """The org's accepted (not revoked) publisher keys, as devices read them through TUF."""
        return publishers_document(self.org, self.publisher_keys, self.revoked_keys)


async def load_policy(org: str) -> OrgPolicy:
    row = await AdmissionPolicy.get_or_none(org=org)
    if row is None:
        return OrgPolicy(org)
    keys: dict[str, tuple[str, Key]] = {}
    for entry in row.publisher_keys:
        keyid, key = str(entry["keyid"]), entry["key"]
        assert isinstance(key, dict)
        keys[keyid] = (str(entry.get("name", "")), SSlibKey.from_dict(keyid, dict(key)))
    return OrgPolicy(
        org=org,
        require_provenance=row.require_provenance,
        publisher_keys=keys,
        revoked_keys=frozenset(row.revoked_keys),
        sigstore_identities=tuple(
            (str(i["identity"]), str(i["issuer"])) for i in row.sigstore_identities
        ),
        trusted_root=row.trusted_root,
    )


async def save_policy(policy: OrgPolicy, by: str) -> None:
    await AdmissionPolicy.update_or_create(
        org=policy.org,
        defaults={
            "require_provenance": policy.require_provenance,
            "publisher_keys": [
                {"keyid": keyid, "name": name, "key": key.to_dict()}
                for keyid, (name, key) in sorted(policy.publisher_keys.items())
            ],
            "revoked_keys": sorted(policy.revoked_keys),
            "sigstore_identities": [
                {"identity": identity, "issuer": issuer}
                for identity, issuer in policy.sigstore_identities
            ],
            "trusted_root": policy.trusted_root,
            "updated_by": by[:64],
        },
    )
    log("policy.changed", org=policy.org, by=by)


# The checks.


@dataclass(frozen=True)
class SignedStatement:
    """The statement is signed by a publisher key of the org and is about this rune."""

    policy: OrgPolicy

    def check(self, evidence: Evidence) -> Verdict:
        assert evidence.statement is not None
        keys = {keyid: key for keyid, (_, key) in self.policy.publisher_keys.items()}
        try:
            verified = verify_statement(
                evidence.statement, evidence.sha256, keys, self.policy.revoked_keys
            )
        except ProvenanceError as exc:
            return Verdict.failed(f"in-toto statement ({exc.kind}): {exc}")
        name = self.policy.publisher_keys[verified.keyid][0] or verified.keyid[:16]
        return Verdict.passed(f"signed by publisher key {name} ({verified.keyid[:16]})")


@dataclass(frozen=True)
class SigstoreBundle:
    """The bundle verifies offline for the rune, from one of the org's accepted identities."""

    policy: OrgPolicy

    def check(self, evidence: Evidence) -> Verdict:
        assert evidence.bundle is not None
        if not self.policy.sigstore_identities:
            return Verdict.failed(f"org {self.policy.org} accepts no Sigstore identity")
        identities: list[Policy[Evidence]] = [
            _SigstoreIdentity(self.policy.trusted_root, identity, issuer)
            for identity, issuer in self.policy.sigstore_identities
        ]
        return AnyOf(*identities).check(evidence)


@dataclass(frozen=True)
class _SigstoreIdentity:
    trusted_root: str
    identity: str
    issuer: str

    def check(self, evidence: Evidence) -> Verdict:
        from sigstore.errors import Error as SigstoreError
        from sigstore.models import Bundle, InvalidBundle
        from sigstore.verify.policy import Identity

        assert evidence.bundle is not None
        who = f"{self.identity} ({self.issuer})"
        try:
            bundle = Bundle.from_json(evidence.bundle)
        except (InvalidBundle, ValueError) as exc:
            return Verdict.failed(f"not a Sigstore bundle: {exc}")
        try:
            loaded = verifier(self.trusted_root)
        except Exception as exc:  # whatever sigstore's trust root loading raises
            return Verdict.failed(f"cannot load the Sigstore trusted root: {exc}")
        try:
            loaded.verify_artifact(
                evidence.rune, bundle, Identity(identity=self.identity, issuer=self.issuer)
            )
        except SigstoreError as exc:
            return Verdict.failed(f"Sigstore bundle for {who}: {exc}")
        return Verdict.passed(f"Sigstore bundle from {who}")


@dataclass(frozen=True)
class NothingRequired:
    """A rune without provenance, in an org that does not require it."""

    policy: OrgPolicy

    def check(self, _evidence: Evidence) -> Verdict:
        if self.policy.require_provenance:
            return Verdict.failed(
                f"org {self.policy.org} requires provenance: an in-toto statement signed by one "
                "of its publisher keys (rune sign, --attestation) or a Sigstore bundle from an "
                "accepted identity (--sigstore-bundle)"
            )
        return Verdict.passed(f"no provenance, which org {self.policy.org} does not require")


def admission_check(policy: OrgPolicy, evidence: Evidence) -> Verdict:
    """The verdict of `policy` on `evidence`: everything given must verify."""
    checks: list[Policy[Evidence]] = []
    if evidence.statement is not None:
        checks.append(SignedStatement(policy))
    if evidence.bundle is not None:
        checks.append(SigstoreBundle(policy))
    if not checks:
        checks.append(NothingRequired(policy))
    return AllOf(*checks).check(evidence)


_VERIFIERS: dict[str, Any] = {}


def verifier(trusted_root: str) -> Any:
    """Sigstore's offline verifier for `production`, `staging` or a trusted root's JSON."""
    from sigstore.models import TrustedRoot
    from sigstore.verify import Verifier

    cached = _VERIFIERS.get(trusted_root)
    if cached is None:
        if trusted_root == "production":
            cached = Verifier.production(offline=True)
        elif trusted_root == "staging":
            cached = Verifier.staging(offline=True)
        else:
            with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
                file.write(trusted_root)
                file.flush()
                cached = Verifier(trusted_root=TrustedRoot.from_file(file.name))
        _VERIFIERS[trusted_root] = cached
    return cached


def check_trusted_root(value: str) -> str:
    """`value` when it is `production`, `staging` or a trusted root Sigstore can read."""
    if value in TRUSTED_ROOTS:
        return value
    try:
        verifier(value)
    except Exception as exc:  # sigstore raises what its JSON and model parsers raise
        raise PolicyError(f"not a Sigstore trusted root ({exc})") from None
    return value


def policy_change(
    policy: OrgPolicy,
    *,
    require_provenance: bool | None = None,
    add_keys: Sequence[tuple[str, Key]] = (),
    revoke_keys: Sequence[str] = (),
    identities: Sequence[tuple[str, str]] = (),
    remove_identities: Sequence[tuple[str, str]] = (),
    trusted_root: str | None = None,
) -> OrgPolicy:
    """`policy` with the changes; `PolicyError` for a change that names nothing known."""
    keys = dict(policy.publisher_keys)
    for name, key in add_keys:
        keys[key.keyid] = (name, key)
    unknown = [k for k in revoke_keys if not any(keyid.startswith(k) for keyid in keys)]
    if unknown:
        raise PolicyError(f"no publisher key {', '.join(unknown)} in org {policy.org}")
    revoked = set(policy.revoked_keys)
    for prefix in revoke_keys:
        revoked |= {keyid for keyid in keys if keyid.startswith(prefix)}
    current = [i for i in policy.sigstore_identities if i not in set(remove_identities)]
    current += [i for i in identities if i not in current]
    return OrgPolicy(
        org=policy.org,
        require_provenance=policy.require_provenance
        if require_provenance is None
        else require_provenance,
        publisher_keys=keys,
        revoked_keys=frozenset(revoked),
        sigstore_identities=tuple(current),
        trusted_root=policy.trusted_root if trusted_root is None else trusted_root,
    )
