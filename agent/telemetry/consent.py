"""The device owner's telemetry opt-ins, kept on the device and changed only on the device.

Rules:
- Nothing derived from rune outputs leaves the device unless its stream is granted here. The
  default is no stream at all; there is no wildcard.
- A stream is named `RUNE/STREAM`: the rune's name (any version, any org) and a stream its
  manifest declares. A grant may lower the stream's privacy budget per period (`budget`), never
  raise it above what the manifest declares.
- Only `fleet-agent consent` writes the file (`state_dir/telemetry/consent.json`, mode 0600,
  replaced atomically). No command from the controller reads or writes it: the `config` command
  takes run settings only (`agent.runconfig`). The reporter reads it again before every report,
  so a revoke stops the next report. Granting or revoking several streams is one write: all of
  them change, or none.
- A file that is not this format is an error naming it; it never counts as consent.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.durable import write_atomically

FILE = Path("telemetry") / "consent.json"
FORMAT = "fleet-consent/1"
STREAM_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}/[a-z][a-z0-9_]{0,31}$")


class ConsentError(Exception):
    """The consent file or a stream name cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Grant:
    stream: str
    at: float
    budget: float | None = None  # the owner's cap per period, if lower than the manifest's

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "budget": self.budget}


def check_stream_id(stream: str) -> str:
    if not STREAM_ID.match(stream):
        raise ConsentError(
            f"{stream!r} is not a stream name; streams are RUNE/STREAM, such as sine/sine_mean "
            "(`fleet-agent consent list` shows the active rune's)"
        )
    return stream


class ConsentStore:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE

    def grants(self) -> dict[str, Grant]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConsentError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            document = json.loads(raw)
            if document.get("format") != FORMAT:
                raise ValueError(f"format {document.get('format')!r}")
            grants = {}
            for stream, body in document["granted"].items():
                budget = body.get("budget")
                if budget is not None and not (isinstance(budget, int | float) and budget > 0):
                    raise ValueError(f"budget {budget!r}")
                grants[check_stream_id(stream)] = Grant(stream, float(body["at"]), budget)
            return grants
        except (ValueError, KeyError, TypeError, AttributeError, ConsentError) as exc:
            raise ConsentError(
                f"{self.path} is not a consent file ({exc}); fix or remove it (removing it "
                "revokes every stream)"
            ) from None

    def grant(self, stream: str, now: float, budget: float | None = None) -> Grant:
        return self.grant_all([stream], now, budget)[0]

    def grant_all(self, streams: Sequence[str], now: float, budget: float | None) -> list[Grant]:
        """Grant every stream in one write: all of them, or (on an error) none."""
        for stream in streams:
            check_stream_id(stream)
        if budget is not None and not (math.isfinite(budget) and budget > 0):
            raise ConsentError(f"a budget is a positive number, not {budget}")
        grants = self.grants()
        made = [Grant(stream, now, budget) for stream in streams]
        grants.update({grant.stream: grant for grant in made})
        self._save(grants)
        return made

    def revoke(self, stream: str) -> bool:
        """Whether `stream` was granted (it is not any more)."""
        return bool(self.revoke_all([stream]))

    def revoke_all(self, streams: Sequence[str]) -> list[str]:
        """Revoke every stream in one write; the ones that were granted."""
        for stream in streams:
            check_stream_id(stream)
        grants = self.grants()
        revoked = [stream for stream in streams if grants.pop(stream, None) is not None]
        if revoked:
            self._save(grants)
        return revoked

    def _save(self, grants: dict[str, Grant]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        document = {
            "format": FORMAT,
            "granted": {s: g.to_json() for s, g in sorted(grants.items())},
        }
        try:
            write_atomically(self.path, json.dumps(document, indent=2).encode())
        except OSError as exc:
            raise ConsentError(f"cannot write {self.path}: {exc.strerror or exc}") from None
