"""Power-loss points: where the test suite kills the agent to prove an install is crash-safe.

Rule: when `FLEET_AGENT_KILL_AT` names a step, the agent sends itself SIGKILL (no cleanup, no
flush, like pulling the plug) the moment it reaches that step. Unset, which is always the case
outside the attack suite, a crash point does nothing. Steps: `download` (part of the rune fetched),
`verify` (downloaded, before the checks finish), `write-slot` (part of the slot written),
`switch` (new slot complete, before the active pointer moves), `probation` (switched, before the
probation record is written).
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "FLEET_AGENT_KILL_AT"
STEPS = ("download", "verify", "write-slot", "switch", "probation")


def crash_point(step: str) -> None:
    if os.environ.get(KILL_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
