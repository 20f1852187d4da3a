"""The agent code manifest: a reproducible digest of the files that make up the device agent.

A device measures the agent code it runs with this manifest, and the controller derives the
reference values for an agent release with the same function, from a wheel, an unpacked release
or a source tree, so the digests compare.

Rules:
- The agent is the Python packages `AGENT_PACKAGES`; their files are every regular file below each
  package directory except bytecode (`__pycache__` directories, `.pyc` and `.pyo` files). Other
  packages of the same distribution (`fleet`, the controller) are not part of it.
- The manifest is one line per file, `<sha256 hex>  <path>\\n`, where `path` is the POSIX path
  relative to the directory that holds the packages (`agent/daemon.py`), sorted by path as UTF-8
  bytes. Its digest is the SHA-256 of those bytes. Nothing else (times, modes, owners, the
  install location) enters it, so the same files give the same digest everywhere.
- A release whose packages are missing, or a wheel that holds none of them, is an error naming
  what was looked for; a manifest is never empty.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

AGENT_PACKAGES = ("agent", "attestation", "ota")
_BYTECODE_SUFFIXES = frozenset({".pyc", ".pyo"})


class ManifestError(Exception):
    """The agent code could not be measured; the message names what is missing."""


@dataclass(frozen=True)
class AgentManifest:
    files: tuple[tuple[str, str], ...]  # (path, sha256), sorted by path

    @property
    def text(self) -> str:
        return "".join(f"{digest}  {path}\n" for path, digest in self.files)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def is_agent_file(path: PurePosixPath) -> bool:
    """Whether a path relative to the packages' directory belongs in the manifest."""
    parts = path.parts
    return (
        len(parts) >= 2
        and parts[0] in AGENT_PACKAGES
        and "__pycache__" not in parts
        and path.suffix not in _BYTECODE_SUFFIXES
    )


def manifest_of_tree(root: Path) -> AgentManifest:
    """The manifest of the agent packages found directly below `root` (a source tree, an
    unpacked release, or the `site-packages` an agent is installed in)."""
    missing = [name for name in AGENT_PACKAGES if not (root / name).is_dir()]
    if missing:
        raise ManifestError(
            f"{root} holds no {', '.join(missing)} package; give the directory that contains "
            f"the agent's packages ({', '.join(AGENT_PACKAGES)})"
        )
    files = []
    for name in AGENT_PACKAGES:
        for path in (root / name).rglob("*"):
            relative = PurePosixPath(path.relative_to(root).as_posix())
            if path.is_file() and not path.is_symlink() and is_agent_file(relative):
                files.append((str(relative), hashlib.sha256(path.read_bytes()).hexdigest()))
    return _manifest(files)


def manifest_of_wheel(wheel: Path) -> AgentManifest:
    """The manifest of the agent packages inside a wheel (a release as it is published)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            files = [
                (info.filename, hashlib.sha256(archive.read(info)).hexdigest())
                for info in archive.infolist()
                if not info.is_dir() and is_agent_file(PurePosixPath(info.filename))
            ]
    except (OSError, zipfile.BadZipFile) as exc:
        raise ManifestError(f"cannot read the wheel {wheel}: {exc}") from None
    if not files:
        raise ManifestError(f"{wheel} holds none of the packages {', '.join(AGENT_PACKAGES)}")
    return _manifest(files)


def manifest_of_release(path: Path) -> AgentManifest:
    """A wheel (`.whl`) or a directory holding the agent packages."""
    if path.is_dir():
        return manifest_of_tree(path)
    if path.suffix == ".whl":
        return manifest_of_wheel(path)
    raise ManifestError(f"{path} is neither a wheel (.whl) nor a directory with the agent packages")


def _manifest(files: Iterable[tuple[str, str]]) -> AgentManifest:
    ordered = tuple(sorted(files, key=lambda item: item[0].encode()))
    if not ordered:
        raise ManifestError(f"no files of {', '.join(AGENT_PACKAGES)} were found")
    return AgentManifest(ordered)
