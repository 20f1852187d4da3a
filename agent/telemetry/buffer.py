"""Signed telemetry reports kept on disk until the broker has acknowledged them.

Rules:
- A report is sealed (signed, its `seq` taken) once, when its window closes, and stored as one
  file `state_dir/telemetry/outbox/{seq:012d}.env` (0600, written atomically); sending it again
  sends the same bytes, so the controller sees the same `seq` and keeps it once.
- Reports are sent oldest first; a file is removed only after the broker acknowledged it (MQTT
  QoS 1 PUBACK). A crash between the two sends it again: at least once.
- The buffer holds at most `max_reports` reports and `max_bytes` bytes. Storing one more removes
  the oldest first, and every report removed that way is counted (`dropped`, persisted in
  `state_dir/telemetry/dropped`) and reported in the next report's `ops.reports_dropped`.
- A file that cannot be read is skipped and removed with a warning; it never blocks the others.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from agent.durable import write_atomically

log = logging.getLogger("fleet.agent.telemetry")

FOLDER = Path("telemetry") / "outbox"
DROPPED = Path("telemetry") / "dropped"
SUFFIX = ".env"
DEFAULT_MAX_REPORTS = 2016  # a week of five-minute windows
DEFAULT_MAX_BYTES = 16 * 1024 * 1024


class ReportBuffer:
    def __init__(
        self,
        state_dir: Path,
        max_reports: int = DEFAULT_MAX_REPORTS,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_reports < 1 or max_bytes < 1:
            raise ValueError("a report buffer holds at least one report")
        self.folder = Path(state_dir) / FOLDER
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dropped_path = Path(state_dir) / DROPPED
        self.max_reports = max_reports
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    @property
    def dropped(self) -> int:
        try:
            return int(self._dropped_path.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def pending(self) -> list[Path]:
        """The stored reports, oldest first."""
        return sorted(self.folder.glob(f"*{SUFFIX}"))

    def add(self, seq: int, data: bytes) -> None:
        """Store a sealed report, dropping the oldest ones if it would not fit otherwise."""
        with self._lock:
            files = self.pending()
            sizes = {path: _size(path) for path in files}
            total = sum(sizes.values())
            dropped = 0
            while files and (
                len(files) + 1 > self.max_reports or total + len(data) > self.max_bytes
            ):
                oldest = files.pop(0)
                total -= sizes[oldest]
                oldest.unlink(missing_ok=True)
                dropped += 1
            if dropped:
                write_atomically(self._dropped_path, str(self.dropped + dropped).encode())
                log.warning("telemetry buffer full: dropped the %d oldest report(s)", dropped)
            write_atomically(self.folder / f"{seq:012d}{SUFFIX}", data)

    def read(self, path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except OSError as exc:
            log.warning("cannot read the buffered report %s (%s); dropping it", path, exc)
            path.unlink(missing_ok=True)
            return None

    def delivered(self, path: Path) -> None:
        path.unlink(missing_ok=True)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
