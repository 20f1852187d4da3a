"""The operator's half of a key rotation: get the root draft, sign it offline, hand it back.

Rules:
- Only the draft the controller returned is signed, and only after checking it is the next root
  version and that every given key is one of the current or new root keys (a wrong file is named).
- For `root`, the draft is signed by the current keys given with `--root-key` *and* by every new
  key (`--new-root-key`): TUF requires a threshold of both, and signing with all new keys proves
  the operator holds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root

from attestation.keys import KeyFileError, load_key_file, public_key_of
from fleet.client import ApiClient

ROTATABLE = ("targets", "snapshot", "timestamp", "root", "command")


class RotationError(Exception):
    """A local problem with a rotation: a bad key file, a missing option, a surprising draft."""


def _signers(paths: list[Path]) -> list[CryptoSigner]:
    try:
        return [load_key_file(p) for p in paths]
    except KeyFileError as exc:
        raise RotationError(str(exc)) from None


def rotate(
    client: ApiClient,
    role: str,
    root_key_files: list[Path],
    new_root_key_files: list[Path],
    threshold: int | None,
) -> dict[str, Any]:
    if role not in ROTATABLE:
        raise RotationError(f"cannot rotate {role!r}; choose one of {', '.join(ROTATABLE)}")
    if role == "command":
        result: dict[str, Any] = client.request(
            "POST", "/api/v1/keys/rotations", json_body={"role": role}
        )
        return result
    if not root_key_files:
        raise RotationError(f"rotating {role} needs the offline root keys: pass --root-key PATH")
    if role != "root" and (new_root_key_files or threshold is not None):
        raise RotationError("--new-root-key and --root-threshold are only for rotating root")
    if role == "root" and not new_root_key_files and threshold is None:
        raise RotationError("rotating root needs --new-root-key PATH... or --root-threshold")
    old = _signers(root_key_files)
    new = _signers(new_root_key_files)
    current = Metadata[Root].from_bytes(client.request("GET", "/api/v1/keys/root.json", raw=True))
    current_ids = set(current.signed.roles["root"].keyids)
    for path, signer in zip(root_key_files, old, strict=True):
        if public_key_of(signer).keyid not in current_ids:
            raise RotationError(f"{path} is not one of this fleet's current root keys")
    body: dict[str, Any] = {"role": role}
    if new:
        body["root_keys"] = [
            {"keyid": public_key_of(s).keyid, "key": public_key_of(s).to_dict()} for s in new
        ]
    if threshold is not None:
        body["threshold"] = threshold
    started = client.request("POST", "/api/v1/keys/rotations", json_body=body)
    draft = Metadata(Root.from_dict(started["root"]))
    if draft.signed.version != current.signed.version + 1:
        raise RotationError(
            f"the controller drafted root version {draft.signed.version}, expected "
            f"{current.signed.version + 1}; refusing to sign"
        )
    for signer in (*old, *new):
        draft.sign(signer, append=True)
    finished: dict[str, Any] = client.request(
        "POST",
        f"/api/v1/keys/rotations/{started['id']}",
        body=draft.to_bytes(),
        content_type="application/json",
    )
    return finished
