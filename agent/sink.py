"""The local output sink: every output of every inference, as JSON lines, in a bounded file.

Rules:
- One line per output record: `{"t": seconds since the epoch, "rune": "name@version",
  "channel": n, "output": value}`, `output` in the Rune serial format the sandbox makes. Floats
  that are not finite are written as "NaN", "inf" and "-inf", so every line is strict JSON.
- The file never grows past `max_bytes`: a line that would take it over first moves the file to
  `PATH.1` (replacing the one before), so the sink holds at most twice `max_bytes`. A record
  whose line alone is over `max_bytes` is replaced by `{"t", "rune", "channel", "dropped": why}`.
- Lines are flushed after each `write` (no fsync: outputs are a log, not state). The file is
  created 0600 with its directory (raw outputs never leave the device), appended to across
  restarts, and reopened when something else moved or removed it (logrotate).
- A file that cannot be written is a `SinkError` naming it; the sink stays usable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from agent.sandbox.outputs import OutputRecord


class SinkError(Exception):
    """The sink file cannot be written; the message names it and why."""


class OutputSink:
    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"a sink holds at least one byte, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._handle: IO[bytes] | None = None
        self._size = 0

    @property
    def rotated_path(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def write(self, t: float, rune: str, records: Sequence[OutputRecord]) -> int:
        """Append one line per record and flush; returns the number of lines written."""
        if not records:
            return 0
        try:
            handle = self._open()
            for record in records:
                head = {"t": t, "rune": rune, "channel": record.channel}
                line = _line({**head, "output": _finite(record.value)})
                if len(line) > self.max_bytes:
                    why = (
                        f"the output's line of {len(line)} bytes is larger than the sink's "
                        f"max_bytes {self.max_bytes}"
                    )
                    line = _line({**head, "dropped": why})
                if self._size and self._size + len(line) > self.max_bytes:
                    handle = self._rotate()
                handle.write(line)
                self._size += len(line)
            handle.flush()
        except OSError as exc:
            self.close()
            raise SinkError(f"cannot write the output sink {self.path}: {exc}") from None
        return len(records)

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            with contextlib.suppress(OSError):
                handle.close()

    def _open(self) -> IO[bytes]:
        if self._handle is not None:
            try:
                same = self.path.stat().st_ino == os.fstat(self._handle.fileno()).st_ino
            except OSError:
                same = False
            if same:
                return self._handle
            self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._handle = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size
        return self._handle

    def _rotate(self) -> IO[bytes]:
        if self._handle is not None:
            self._handle.flush()
        self.close()
        self.path.replace(self.rotated_path)
        return self._open()


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    return value
