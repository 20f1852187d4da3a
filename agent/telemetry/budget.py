"""The privacy budget each stream may spend per period, on the device, across restarts.

Rules:
- A stream's period is the manifest's `period_s`, aligned to the epoch (a day is a UTC day).
  What it spends in a period is the sum of its reports' epsilons (and deltas): basic sequential
  composition, which holds for any mix of the stream's mechanisms.
- `spend` is write-ahead: the spend is stored durably before the report it pays for is made, so a
  crash can lose a report but never release one that was not paid for. A spend that would take a
  stream over its budget (the manifest's, or the owner's lower cap) is refused and stores nothing;
  the stream then sends nothing until its next period.
- The file (`state_dir/telemetry/budget.json`) keeps the current period per stream only. A file
  that is not this format is an error naming it: resetting it would hand out budget again.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.durable import write_atomically

FILE = Path("telemetry") / "budget.json"
FORMAT = "fleet-privacy-budget/1"
_SLACK = 1e-9  # float sums of epsilons: 24 x 1/24 must still fit a budget of 1


class BudgetError(Exception):
    """The budget file cannot be used; the message names it and what to do."""


@dataclass(frozen=True)
class Spent:
    period_start: float
    epsilon: float
    delta: float
    reports: int

    def to_json(self) -> dict[str, Any]:
        return {
            "period_start": self.period_start,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "reports": self.reports,
        }


def period_start(now: float, period_s: float) -> float:
    return math.floor(now / period_s) * period_s


class BudgetLedger:
    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / FILE
        self._lock = threading.Lock()
        self._spent = self._load()

    def spent(self, stream: str, period_s: float, now: float) -> Spent:
        start = period_start(now, period_s)
        with self._lock:
            current = self._spent.get(stream)
        if current is None or current.period_start != start:
            return Spent(start, 0.0, 0.0, 0)
        return current

    def spend(
        self, stream: str, epsilon: float, delta: float, budget: float, period_s: float, now: float
    ) -> bool:
        """Pay for one report, durably, if it fits the budget; whether it did."""
        with self._lock:
            start = period_start(now, period_s)
            current = self._spent.get(stream)
            if current is None or current.period_start != start:
                current = Spent(start, 0.0, 0.0, 0)
            if current.epsilon + epsilon > budget + _SLACK:
                return False
            spent = Spent(
                start, current.epsilon + epsilon, current.delta + delta, current.reports + 1
            )
            self._spent[stream] = spent
            try:
                self._save()
            except OSError as exc:
                self._spent[stream] = current
                raise BudgetError(f"cannot write {self.path}: {exc.strerror or exc}") from None
            return True

    def _load(self) -> dict[str, Spent]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise BudgetError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        try:
            document = json.loads(raw)
            if document.get("format") != FORMAT:
                raise ValueError(f"format {document.get('format')!r}")
            return {
                str(stream): Spent(
                    float(body["period_start"]),
                    float(body["epsilon"]),
                    float(body["delta"]),
                    int(body["reports"]),
                )
                for stream, body in document["streams"].items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BudgetError(
                f"{self.path} is not a privacy budget file ({exc}); restore it from a backup. "
                "Removing it would let every stream spend its budget again this period."
            ) from None

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        document = {
            "format": FORMAT,
            "streams": {s: spent.to_json() for s, spent in sorted(self._spent.items())},
        }
        write_atomically(self.path, json.dumps(document, indent=2).encode())
