"""What a rune target is called in the repository and what its TUF `custom` metadata says.

Rules:
- A rune is published as `runes/{org}/{name}/{version}`. Each part is 1-64 characters of lowercase
  letters, digits, `.`, `_` and `-`, starting with a letter or digit, so a path can never climb
  out of its folder or collide with another rune's.
- The target's `custom["fleet"]` is the contract between controller and agent: org, name, version,
  kind (`bundle` or `legacy`), the capability kinds the rune reads, and the minimum agent version.
  The agent checks it before installing and checks the rune's own manifest against it after
  downloading; `RuneTarget.from_custom` refuses anything missing or malformed with the reason.
- The controller's command public key is the target `fleet/command-key.json`, so it rotates
  through TUF like any other target.
- A rune admitted with provenance names it in `custom["provenance"]` (`ProvenanceRef`): the kind,
  the target that holds it (`provenance/{org}/{name}/{version}`) and its SHA-256. An org's
  accepted publisher keys are the target `publishers/{org}.json`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

RUNES_PREFIX = "runes"
COMMAND_KEY_TARGET = "fleet/command-key.json"
DEFAULT_ORG = "default"
KINDS = ("bundle", "legacy")
PROVENANCE_KINDS = ("dsse", "sigstore")
PROVENANCE_PREFIX = "provenance"
PUBLISHERS_PREFIX = "publishers"

_PART = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_VERSION = re.compile(r"^\d+(\.\d+)*")


class TargetNameError(ValueError):
    """A rune name, version, org or reference that cannot be a target."""


def check_part(what: str, value: str) -> str:
    if not isinstance(value, str) or not _PART.fullmatch(value) or ".." in value:
        raise TargetNameError(
            f"{what} {value!r} must be 1-64 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def rune_target_path(org: str, name: str, version: str) -> str:
    return "/".join(
        (
            RUNES_PREFIX,
            check_part("org", org),
            check_part("name", name),
            check_part("version", version),
        )
    )


def parse_rune_ref(ref: str) -> tuple[str, str]:
    """`NAME@VERSION` as (name, version)."""
    name, sep, version = ref.partition("@")
    if not sep or not name or not version:
        raise TargetNameError(f"{ref!r} is not NAME@VERSION (for example sine@1.0.0)")
    return check_part("name", name), check_part("version", version)


def parse_target_path(path: str) -> tuple[str, str, str]:
    parts = path.split("/")
    if len(parts) != 4 or parts[0] != RUNES_PREFIX:
        raise TargetNameError(f"{path!r} is not a rune target (runes/ORG/NAME/VERSION)")
    _, org, name, version = parts
    return check_part("org", org), check_part("name", name), check_part("version", version)


def version_key(version: str) -> tuple[int, ...]:
    """The numeric prefix of a version as a tuple (`1.10.2-rc1` -> (1, 10, 2)) for ordering."""
    match = _VERSION.match(version)
    if match is None:
        return ()
    return tuple(int(p) for p in match.group(0).split("."))


def provenance_target_path(org: str, name: str, version: str) -> str:
    """The target that holds what the rune `org/name@version` was admitted with."""
    return f"{PROVENANCE_PREFIX}/{org}/{name}/{version}"


def publishers_target_path(org: str) -> str:
    """The target that holds an org's accepted publisher keys."""
    return f"{PUBLISHERS_PREFIX}/{org}.json"


@dataclass(frozen=True)
class ProvenanceRef:
    """Where a rune target's provenance is published (`custom["provenance"]`), and what it is:
    `dsse` (an in-toto statement signed by a publisher key) or `sigstore` (a Sigstore bundle)."""

    kind: str
    path: str
    sha256: str

    def to_custom(self) -> dict[str, str]:
        return {"kind": self.kind, "target": self.path, "sha256": self.sha256}

    @classmethod
    def from_custom(cls, custom: Any) -> ProvenanceRef | None:
        """The reference in a rune target's `custom`, None when it has none; `TargetNameError`
        when it is malformed."""
        value = custom.get("provenance") if isinstance(custom, dict) else None
        if value is None:
            return None
        if not isinstance(value, dict) or not all(
            isinstance(value.get(k), str) for k in ("kind", "target", "sha256")
        ):
            raise TargetNameError("the target's provenance reference is malformed")
        if value["kind"] not in PROVENANCE_KINDS:
            raise TargetNameError(f"unknown provenance kind {value['kind']!r}")
        return cls(value["kind"], value["target"], value["sha256"])


@dataclass(frozen=True)
class RuneTarget:
    org: str
    name: str
    version: str
    kind: str
    capabilities: tuple[str, ...]
    min_agent_version: str

    @property
    def path(self) -> str:
        return rune_target_path(self.org, self.name, self.version)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def to_custom(self) -> dict[str, Any]:
        return {
            "fleet": {
                "org": self.org,
                "name": self.name,
                "version": self.version,
                "kind": self.kind,
                "capabilities": list(self.capabilities),
                "min_agent_version": self.min_agent_version,
            }
        }

    @classmethod
    def from_custom(cls, path: str, custom: Any) -> RuneTarget:
        """The rune target described by `custom`, which must agree with its `path`."""
        fleet = custom.get("fleet") if isinstance(custom, dict) else None
        if not isinstance(fleet, dict):
            raise TargetNameError(f"{path} has no fleet metadata; it is not a rune target")
        texts = ("org", "name", "version", "kind", "min_agent_version")
        missing = [k for k in (*texts, "capabilities") if k not in fleet]
        if missing:
            raise TargetNameError(f"{path} has incomplete fleet metadata (no {', '.join(missing)})")
        wrong = [k for k in texts if not isinstance(fleet[k], str)]
        capabilities = fleet["capabilities"]
        if not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
            wrong.append("capabilities")
        if wrong:
            raise TargetNameError(f"{path} has malformed fleet metadata ({', '.join(wrong)})")
        target = cls(
            org=fleet["org"],
            name=fleet["name"],
            version=fleet["version"],
            kind=fleet["kind"],
            capabilities=tuple(capabilities),
            min_agent_version=fleet["min_agent_version"],
        )
        if target.path != path:
            raise TargetNameError(f"{path} carries metadata for {target.path}")
        if target.kind not in KINDS:
            raise TargetNameError(f"{path} has unknown kind {target.kind!r}")
        return target
