"""Admitting a rune: inspect it, name it, store it content-addressed and publish it as a target.

Rules:
- A rune is inspected before anything is stored; a malformed one is refused with the reason.
- A bundle names itself (its manifest's name and version); `--name`/`--version` may only repeat
  them. A legacy `.rune` carries no name or version, so both must be given.
- (org, name, version) is immutable: pushing the same bytes again is a no-op that says so, pushing
  different bytes (or re-pushing a revoked version) is refused; publish a new version instead.
- The database row and the TUF target are written in one transaction, under the repository lock
  (taken first), so concurrent pushes or revocations of one version get 409, never a 500.
- Provenance is checked against the org's admission policy (`fleet.provenance`) before anything
  is stored: a refusal is a 422 naming every reason. What the rune was admitted with is
  published as a target beside it, in the same new `targets`, and named (its path and SHA-256)
  in the rune target's `custom`, so a device finds and checks it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tortoise.transactions import in_transaction

from fleet.db.models import Rune
from fleet.provenance import DSSE, SIGSTORE, admission_check, load_policy
from fleet.provenance import Evidence as ProvenanceEvidence
from fleet.tuf_store import FleetRepository
from ota.rune.bundle import sha256_hex
from ota.rune.inspect import InspectError, describe_rune
from ota.targets import (
    ProvenanceRef,
    RuneTarget,
    TargetNameError,
    check_part,
    provenance_target_path,
)


class AdmissionError(Exception):
    """A push that is not admitted: the HTTP status, and `kind` (`provenance` when the org's
    admission policy refused it, `invalid` otherwise)."""

    def __init__(self, status: int, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Admitted:
    rune: Rune
    created: bool


def rune_json(rune: Rune) -> dict[str, Any]:
    return {
        "org": rune.org,
        "name": rune.name,
        "version": rune.version,
        "ref": f"{rune.name}@{rune.version}",
        "kind": rune.kind,
        "sha256": rune.sha256,
        "size": rune.size,
        "capabilities": rune.capabilities,
        "min_agent_version": rune.min_agent_version,
        "target": rune.target_path,
        "pushed_by": rune.pushed_by,
        "created_at": rune.created_at.isoformat() if rune.created_at else None,
        "state": "revoked" if rune.revoked_at else "published",
        "revoked_at": rune.revoked_at.isoformat() if rune.revoked_at else None,
        "revoked_by": rune.revoked_by,
        "provenance": (
            {
                "kind": rune.provenance,
                "sha256": rune.provenance_sha256,
                "verified": rune.provenance_signer,
                "target": provenance_target_path(rune.org, rune.name, rune.version),
            }
            if rune.provenance
            else None
        ),
    }


async def admit_rune(
    repository: FleetRepository,
    data: bytes,
    *,
    org: str,
    name: str | None,
    version: str | None,
    min_agent_version: str,
    pushed_by: str,
    max_bytes: int,
    now: datetime,
    statement: bytes | None = None,
    bundle: bytes | None = None,
) -> Admitted:
    if len(data) > max_bytes:
        raise AdmissionError(413, f"the rune is {len(data)} bytes; this fleet accepts {max_bytes}")
    if not data:
        raise AdmissionError(400, "the request carried no rune file")
    try:
        description = await asyncio.to_thread(describe_rune, data, name or "rune")
    except InspectError as exc:
        raise AdmissionError(422, f"not a valid rune: {exc}") from None
    if description.kind == "bundle":
        for given, own, what in (
            (name, description.name, "name"),
            (version, description.version, "version"),
        ):
            if given is not None and given != own:
                raise AdmissionError(
                    400, f"the bundle's {what} is {own!r}, not {given!r}; rebuild it or omit it"
                )
        name, version = description.name, description.version
    elif name is None or version is None:
        raise AdmissionError(
            400, "a legacy .rune carries no name or version: pass both (--name, --version)"
        )
    try:
        target = RuneTarget(
            org=check_part("org", org),
            name=check_part("name", name),
            version=check_part("version", version),
            kind=description.kind,
            capabilities=tuple(sorted({str(c["kind"]).upper() for c in description.capabilities})),
            min_agent_version=min_agent_version,
        )
    except TargetNameError as exc:
        raise AdmissionError(400, str(exc)) from None
    policy = await load_policy(target.org)
    evidence = ProvenanceEvidence(data, description.sha256, statement, bundle)
    verdict = await asyncio.to_thread(admission_check, policy, evidence)
    if not verdict:
        raise AdmissionError(
            422, f"{target.ref} in {target.org}: provenance refused: {verdict.reason}", "provenance"
        )
    provenance = statement if statement is not None else bundle
    kind = DSSE if statement is not None else SIGSTORE if bundle is not None else None
    custom = target.to_custom()
    items = [(target.path, data, custom)]
    if provenance is not None and kind is not None:
        path = provenance_target_path(target.org, target.name, target.version)
        custom["provenance"] = ProvenanceRef(kind, path, sha256_hex(provenance)).to_custom()
        items.insert(0, (path, provenance, {"fleet-provenance": {"kind": kind}}))
    # Checked and written under the repository lock (taken before the transaction; see
    # FleetRepository.lock), so concurrent pushes of one version are answered one by one.
    async with repository.lock:
        existing = await Rune.get_or_none(org=target.org, name=target.name, version=target.version)
        if existing is not None:
            if existing.revoked_at is not None:
                raise AdmissionError(
                    409, f"{target.ref} in {target.org} was revoked; publish a new version"
                )
            if existing.sha256 != description.sha256:
                raise AdmissionError(
                    409,
                    f"{target.ref} in {target.org} is already published with different bytes "
                    f"(sha256 {existing.sha256[:12]}); publish a new version",
                )
            return Admitted(existing, created=False)
        async with in_transaction():
            rune = await Rune.create(
                org=target.org,
                name=target.name,
                version=target.version,
                kind=target.kind,
                sha256=description.sha256,
                size=description.size,
                capabilities=list(target.capabilities),
                min_agent_version=target.min_agent_version,
                description=description.to_json(),
                target_path=target.path,
                pushed_by=pushed_by,
                provenance=kind,
                provenance_sha256=sha256_hex(provenance) if provenance is not None else None,
                provenance_signer=verdict.reason[:255] if kind is not None else None,
            )
            await repository.add_targets_locked(items, now)
    return Admitted(rune, created=True)


async def revoke_rune(
    repository: FleetRepository, rune: Rune, revoked_by: str, now: datetime
) -> Rune:
    async with repository.lock:
        await rune.refresh_from_db()  # another request may have revoked it meanwhile
        if rune.revoked_at is not None:
            raise AdmissionError(409, f"{rune.name}@{rune.version} is already revoked")
        async with in_transaction():
            rune.revoked_at = now
            rune.revoked_by = revoked_by
            await rune.save()
            await repository.remove_target_locked(rune.target_path, now)
            if rune.provenance:
                path = provenance_target_path(rune.org, rune.name, rune.version)
                await repository.remove_target_locked(path, now)
    return rune
