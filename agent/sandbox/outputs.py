"""What a rune's outputs look like to the person or program running it.

Rules:
- Every inference yields `OutputRecord`s: the output channel and a JSON value in the Rune
  project's serial format, `{"type_name", "channel", "elements", "dimensions"}`.
- A legacy rune's SERIAL bytes must be UTF-8 JSON: one object, or an array of them (a stage with
  several inputs); anything else is a `GuestFault`.
- Non-finite floats are written as the strings "NaN", "inf" and "-inf" so the output stays JSON.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from agent.sandbox.errors import GuestFault
from ota.rune.tensors import Tensor


@dataclass(frozen=True)
class OutputRecord:
    channel: int
    value: Any


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def tensor_json(tensor: Tensor, channel: int) -> dict[str, Any]:
    return {
        "type_name": tensor.element.type_name,
        "channel": channel,
        "elements": [_finite(v) for v in tensor.elements()],
        "dimensions": list(tensor.dimensions),
    }


def serial_record(data: bytes, channel: int, what: str) -> OutputRecord:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GuestFault(f"{what} wrote serial output that is not UTF-8 JSON: {exc}") from None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, dict) for item in items):
        raise GuestFault(f"{what} wrote serial output that is not a JSON object or array of them")
    return OutputRecord(channel, value)
