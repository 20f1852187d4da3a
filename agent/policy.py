"""The device owner's policy for updates: `agent.yaml` in the state dir (optional).

    allowed_capabilities: [RAND, ACCEL]   # capability kinds a rune may read (default: all)
    health_check_calls: 3                 # calls a new rune must survive before the switch
    allow_downgrade: false                # accept an older version of the active rune
    require_provenance: false             # refuse runes published without provenance
    probation: {window: 600, max_failures: 3, min_successes: 20}
    telemetry: {window_s: 300, buffer_reports: 2016}   # report window, reports kept offline
    run: {...}                            # the run loop's settings: see agent.runconfig

Rules: the file is optional (the defaults apply); an unknown key or a bad value is a
`PolicyError` naming it. The controller cannot change these settings: they are the owner's. The
`run:` section is not read here: `agent.runconfig` reads and checks it, and it is the only part
of the file a controller `config` command may rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.probation import ProbationError, ProbationPolicy
from ota.rune.runefile import CapabilityKind

POLICY_FILE = "agent.yaml"
_KEYS = {
    "allowed_capabilities",
    "health_check_calls",
    "allow_downgrade",
    "require_provenance",
    "probation",
    "telemetry",
    "run",
}
_TELEMETRY_KEYS = {"window_s", "buffer_reports"}
MIN_WINDOW_S = 1.0
MAX_WINDOW_S = 86400.0


class PolicyError(ValueError):
    """An `agent.yaml` that cannot be used, with the key and what is wrong."""


@dataclass(frozen=True)
class AgentPolicy:
    allowed_capabilities: frozenset[str] = frozenset(CapabilityKind.__members__)
    health_check_calls: int = 3
    allow_downgrade: bool = False
    probation: ProbationPolicy = field(default_factory=ProbationPolicy)
    require_provenance: bool = False
    telemetry_window_s: float = 300.0
    telemetry_buffer_reports: int = 2016

    def allowed_kinds(self) -> frozenset[CapabilityKind]:
        return frozenset(CapabilityKind[name] for name in self.allowed_capabilities)

    @classmethod
    def load(cls, state_dir: Path) -> AgentPolicy:
        path = state_dir / POLICY_FILE
        if not path.exists():
            return cls()
        try:
            data: Any = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise PolicyError(f"{path}: cannot read it ({exc})") from None
        if not isinstance(data, dict):
            raise PolicyError(f"{path}: expected a mapping of settings")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise PolicyError(f"{path}: unknown setting(s) {', '.join(map(str, unknown))}")
        caps = data.get("allowed_capabilities", sorted(CapabilityKind.__members__))
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise PolicyError(f"{path}: allowed_capabilities must be a list of names")
        names = {c.upper() for c in caps}
        bad = sorted(names - set(CapabilityKind.__members__))
        if bad:
            raise PolicyError(f"{path}: unknown capabilities {', '.join(bad)}")
        calls = data.get("health_check_calls", 3)
        if not isinstance(calls, int) or isinstance(calls, bool) or not 1 <= calls <= 1000:
            raise PolicyError(f"{path}: health_check_calls must be a whole number 1-1000")
        downgrade = data.get("allow_downgrade", False)
        if not isinstance(downgrade, bool):
            raise PolicyError(f"{path}: allow_downgrade must be true or false")
        require_provenance = data.get("require_provenance", False)
        if not isinstance(require_provenance, bool):
            raise PolicyError(f"{path}: require_provenance must be true or false")
        probation = data.get("probation", {})
        if not isinstance(probation, dict):
            raise PolicyError(f"{path}: probation must be a mapping")
        try:
            probation_policy = ProbationPolicy(**probation)
        except (TypeError, ProbationError) as exc:
            raise PolicyError(f"{path}: probation: {exc}") from None
        window_s, buffer_reports = _telemetry(path, data.get("telemetry", {}))
        return cls(
            frozenset(names),
            calls,
            downgrade,
            probation_policy,
            require_provenance,
            window_s,
            buffer_reports,
        )


def _telemetry(path: Path, raw: Any) -> tuple[float, int]:
    if not isinstance(raw, dict) or set(raw) - _TELEMETRY_KEYS:
        raise PolicyError(f"{path}: telemetry takes {', '.join(sorted(_TELEMETRY_KEYS))}")
    window = raw.get("window_s", 300.0)
    if isinstance(window, bool) or not isinstance(window, int | float):
        raise PolicyError(f"{path}: telemetry.window_s must be a number of seconds")
    if not MIN_WINDOW_S <= window <= MAX_WINDOW_S:
        raise PolicyError(
            f"{path}: telemetry.window_s must be {MIN_WINDOW_S:g} to {MAX_WINDOW_S:g} seconds"
        )
    kept = raw.get("buffer_reports", 2016)
    if not isinstance(kept, int) or isinstance(kept, bool) or not 1 <= kept <= 100_000:
        raise PolicyError(f"{path}: telemetry.buffer_reports must be a whole number 1-100000")
    return float(window), kept
