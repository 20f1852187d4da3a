"""A device's check of a rune's provenance, after TUF verified the rune and before it is run.

Rules:
- A rune target names its provenance in `custom["provenance"]` (`ota.targets.ProvenanceRef`). A
  rune without one is refused when the device requires provenance, and otherwise accepted with
  that said in the update's report.
- The provenance is itself a TUF target, fetched and verified like the rune; its SHA-256 must also
  be the one the rune target names, so a rune cannot be paired with another rune's provenance.
- `dsse`: the statement's signature must verify with one of the org's accepted publisher keys,
  read from the TUF target `publishers/{org}.json` (a key revoked there is refused), and its
  subject must be the rune's SHA-256 (`attestation.provenance.verify_statement`).
- `sigstore`: the bundle's message signature must be over the rune, made by its certificate's key
  (`attestation.provenance.check_bundle_binding`); the controller verified its chain, log entry
  and identity offline at admission, and TUF's signature on the target carries that verdict.
- Every refusal is `UpdateRefused` of kind `provenance`, raised before anything is written.
"""

from __future__ import annotations

from attestation.provenance import (
    ProvenanceError,
    check_bundle_binding,
    read_publishers,
    verify_statement,
)
from ota.targets import ProvenanceRef, RuneTarget, TargetNameError, publishers_target_path
from ota.updater import TufClient, UpdateRefused


def check_rune_provenance(
    client: TufClient,
    target: RuneTarget,
    custom: dict[str, object],
    data: bytes,
    sha256: str,
    *,
    required: bool,
) -> str:
    """What the rune's provenance says (one line for the report), or `UpdateRefused`."""
    try:
        ref = ProvenanceRef.from_custom(custom)
    except TargetNameError as exc:
        raise UpdateRefused(f"{target.ref}: {exc}", "provenance") from None
    if ref is None:
        if required:
            raise UpdateRefused(
                f"{target.ref} was published without provenance, and this device requires it "
                "(require_provenance in agent.yaml)",
                "provenance",
            )
        return "published without provenance (this device does not require it)"
    evidence = client.fetch_target(ref.path)
    if evidence.sha256 != ref.sha256:
        raise UpdateRefused(
            f"{target.ref}: the provenance at {ref.path} is not the one its target names",
            "provenance",
        )
    try:
        if ref.kind == "dsse":
            publishers = client.fetch_target(publishers_target_path(target.org))
            keys, revoked = read_publishers(publishers.data, target.org)
            verified = verify_statement(evidence.data, sha256, keys, revoked)
            return f"in-toto statement signed by publisher key {verified.keyid[:16]}"
        signer = check_bundle_binding(evidence.data, data, sha256)
    except ProvenanceError as exc:
        raise UpdateRefused(f"{target.ref}: provenance ({exc.kind}): {exc}", "provenance") from None
    return f"Sigstore bundle signed by {signer} (identity checked at admission)"
