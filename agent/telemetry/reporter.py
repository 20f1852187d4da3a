"""The device's telemetry reports: one per window, operational state always, streams by consent.

Rules:
- Every `window_s` (the owner's `telemetry.window_s`) the reporter closes the window and makes one
  report, online or not: the operational state (`ota.telemetry`), which is never derived from a
  sensor value, and one noisy aggregate per stream that (1) the active rune's manifest declares,
  (2) the owner granted (`agent.telemetry.consent`, read again for every report), (3) observed
  something in the window and (4) still fits its privacy budget for the period (`budget`, paid
  before the noise is drawn). Nothing else of the rune's outputs is in it.
- A stream the owner revoked is named once in `paused` (`revoked`); one whose budget is spent is
  named in `paused` (`budget`) for as long as it is.
- The window's observations belong to one rune: when the active rune changes, what the previous
  one observed in the window is discarded, never reported under the new one.
- The report is checked with the controller's own rules (`ota.telemetry.check_report`), signed
  once with the device key under the `telemetry` sequence, and stored in the buffer
  (`agent.telemetry.buffer`); `deliver` publishes what is buffered, oldest first, each removed
  after the broker's acknowledgement. A report that fails to be made is logged; the loop goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import resource
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.channel_state import ChannelState
from agent.policy import AgentPolicy
from agent.runloop import LoopStats, RuneLoop
from agent.sandbox.outputs import OutputRecord
from agent.slots import SlotRune
from agent.telemetry.budget import BudgetError, BudgetLedger
from agent.telemetry.buffer import ReportBuffer
from agent.telemetry.consent import ConsentError, ConsentStore, Grant
from agent.telemetry.noise import release
from agent.telemetry.windows import StreamSource, WindowAggregator, stream_sources
from attestation.identity import DeviceIdentity
from ota.protocol import CONTROLLER, Channel, Message, MessageType, Refusal, seal_message, topic
from ota.rune.bundle import BundleError, is_bundle, read_bundle
from ota.telemetry import TELEMETRY_TTL_S, Report, StreamValue, check_report

log = logging.getLogger("fleet.agent.telemetry")

SEQ_STREAM = "telemetry"


class Reporter:
    def __init__(
        self,
        state_dir: Path,
        identity: DeviceIdentity,
        channel: ChannelState,
        loop: RuneLoop,
        policy: AgentPolicy,
        *,
        agent_version: str,
        active: Callable[[], dict[str, str] | None],
        deployment: Callable[[], str],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.identity = identity
        self.channel = channel
        self.loop = loop
        self.window_s = policy.telemetry_window_s
        self.consent = ConsentStore(state_dir)
        self.budget = BudgetLedger(state_dir)
        self.buffer = ReportBuffer(state_dir, policy.telemetry_buffer_reports)
        self.windows = WindowAggregator()
        self.clock = clock
        self._agent_version = agent_version
        self._active = active
        self._deployment = deployment
        self._started = time.monotonic()
        self._window_start = clock()
        self._sources: dict[str, tuple[str, list[StreamSource]]] = {}  # sha -> (name, sources)
        self._current: tuple[str, list[StreamSource]] = ("", [])
        self._baseline = loop.stats()
        self._cpu = _cpu_seconds()
        self._sent: set[str] = set()
        self._ready = asyncio.Event()

    # -- observing (the rune loop's thread) ----------------------------------------------------

    def observe(self, info: SlotRune, data: bytes, records: list[OutputRecord]) -> None:
        known = self._sources.get(info.sha256)
        if known is None:
            known = (info.name, _streams_of(data))
            self._sources = {info.sha256: known}  # one rune at a time
        self._current = known
        self.windows.use(f"{info.org}/{info.ref}", known[1])
        self.windows.observe(records)

    # -- reports -------------------------------------------------------------------------------

    def close_window(self) -> int:
        """End the window, make its report and buffer it; the report's seq."""
        now = self.clock()
        rune, vectors = self.windows.close()
        name, sources = self._current
        grants = self._grants()
        streams: list[StreamValue] = []
        paused: list[tuple[str, str]] = []
        for source in sources:
            spec = source.spec
            stream_id = f"{name}/{spec.name}"
            grant = grants.get(stream_id)
            if grant is None:
                if stream_id in self._sent:
                    self._sent.discard(stream_id)
                    paused.append((stream_id, "revoked"))
                continue
            vector = vectors.get(spec.name)
            if vector is None or rune is None:
                continue
            budget = spec.budget if grant.budget is None else min(spec.budget, grant.budget)
            paid = self.budget.spend(
                stream_id, spec.epsilon, spec.delta, budget, spec.period_s, now
            )
            if not paid:
                paused.append((stream_id, "budget"))
                continue
            noisy = release(spec, vector)
            streams.append(
                StreamValue(
                    stream_id,
                    rune,
                    spec.kind,
                    spec.keys,
                    noisy.values,
                    spec.mechanism,
                    spec.epsilon,
                    spec.delta,
                    noisy.noise_std,
                )
            )
            self._sent.add(stream_id)
        start = min(self._window_start, now - 1e-3)
        report = Report(start, now, self._ops(), tuple(streams), tuple(paused))
        body = report.to_json()
        check_report(body)
        seq = self.channel.next_seq(SEQ_STREAM)
        message = Message(
            self.identity.device_id,
            CONTROLLER,
            seq,
            now,
            now + TELEMETRY_TTL_S,
            MessageType.TELEMETRY,
            body,
        )
        self.buffer.add(seq, seal_message(message, self.identity.signer))
        self._window_start = now
        self._ready.set()
        return seq

    def _grants(self) -> dict[str, Grant]:
        try:
            return self.consent.grants()
        except ConsentError as exc:
            log.warning("no stream is sent: %s", exc)
            return {}

    def _ops(self) -> dict[str, Any]:
        stats, before = self.loop.stats(), self._baseline
        self._baseline = stats
        cpu, previous = _cpu_seconds(), self._cpu
        self._cpu = cpu
        return {
            "agent_version": self._agent_version[:32] or "unknown",
            "uptime_s": round(time.monotonic() - self._started, 3),
            "active": self._active(),
            "deployment": self._deployment()[:32] or "idle",
            "inferences": max(stats.inferences - before.inferences, 0),
            "failures": max(stats.failures - before.failures, 0),
            "waiting": max(stats.waiting - before.waiting, 0),
            "sandbox_errors": _error_deltas(stats, before),
            "latency_ms": {
                "p50": _ms(stats.latency_p50_s),
                "p95": _ms(stats.latency_p95_s),
            },
            "cpu_s": round(max(cpu - previous, 0.0), 4),
            "rss_bytes": _rss_bytes(),
            "reports_dropped": self.buffer.dropped,
        }

    # -- the loops -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Close a window every `window_s` until `stop` is set."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.window_s)
            if stop.is_set():
                break
            try:
                await asyncio.to_thread(self.close_window)
            except (BudgetError, OSError, ValueError, Refusal) as exc:
                log.error("the telemetry report for this window was not made: %s", exc)

    async def deliver(self, publish: Callable[[str, bytes], Awaitable[None]]) -> None:
        """Publish buffered reports, oldest first, each removed once the broker has it."""
        name = topic(self.identity.device_id, Channel.TELEMETRY)
        while True:
            self._ready.clear()
            pending = self.buffer.pending()
            if not pending:
                await self._ready.wait()
                continue
            for path in pending:
                data = self.buffer.read(path)
                if data is not None:
                    await publish(name, data)
                    self.buffer.delivered(path)


def _streams_of(data: bytes) -> list[StreamSource]:
    if not is_bundle(data):
        return []  # a legacy .rune declares no streams
    try:
        return stream_sources(read_bundle(data).manifest)
    except BundleError:
        return []


def _error_deltas(stats: LoopStats, before: LoopStats) -> dict[str, int]:
    deltas = {k: v - before.errors.get(k, 0) for k, v in stats.errors.items()}
    return {k[:32]: v for k, v in sorted(deltas.items()) if v > 0}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or not math.isfinite(seconds) else round(seconds * 1000, 3)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_bytes().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
