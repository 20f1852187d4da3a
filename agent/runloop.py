"""The run loop: the active rune, run continuously on the configured input, outputs to the sink.

Rules:
- One `step` is one inference. It runs whatever rune is active in the slots at that moment
  (`Slots.active` checks its SHA-256 every time) and loads it again whenever that digest changes,
  the input source changes, or a call of it failed or was interrupted (a fresh instance, never
  one left mid-call).
- Every run of a rune is reported to probation (`Slots.record_run`): ok, or failed with the
  sandbox's reason. That includes a rune that does not load, traps, hits a limit, asks for a
  capability the owner's policy refuses or for inputs of the wrong size. Probation may then pass
  the rune or roll back to the previous one; the step says so.
- What is not the rune's fault is not reported to probation, so it cannot roll back (and so
  retire) a good rune: the device's input failing (`SourceError`: no such replay path,
  malformed data, a capability the source does not make) is a failed step; a stream that has not
  sent a whole window yet is a `waiting` step (its values are kept for the next call); no active
  rune is an `idle` step; slots that cannot be read or written are a failed step.
- Outputs go to the sink before the run is reported. A sink that cannot be written does not fail
  the run (the rune did its job): the step carries `sink_error`.
- `run` never ends on a failure: it runs `step` in a worker thread at a fixed rate (one start
  every `interval_s`; a step longer than that is followed at once by the next one) until `stop`
  is set, and hands each result to `on_event` on the event loop. An unexpected exception in a
  step is logged and reported as a failed step.
- `reconfigure` may be called from any thread at any time: the new settings apply from the next
  step, and a shorter interval cuts the current wait. The counters (`stats`) cover every step
  since the loop was made, the rune's sandbox errors by kind among them; latency is the rune call
  alone, over the last `LATENCY_WINDOW` runs.
- After the sink, a successful run's outputs go to `on_outputs` (telemetry's windows), on the
  step's thread; what it raises is logged and changes nothing about the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.policy import AgentPolicy
from agent.runconfig import RunConfig
from agent.sandbox.errors import SandboxError
from agent.sandbox.limits import SandboxLimits
from agent.sandbox.outputs import OutputRecord
from agent.sandbox.runner import LoadedRune, load_rune
from agent.sensors import InputPending, LiveSources, SourceError
from agent.sink import OutputSink, SinkError
from agent.slots import RunOutcome, RunResult, SlotError, SlotRune, Slots

log = logging.getLogger(__name__)

LATENCY_WINDOW = 512


class StepKind(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"
    PASSED_PROBATION = "passed_probation"
    IDLE = "idle"
    WAITING = "waiting"


@dataclass(frozen=True)
class StepResult:
    """What one step did.

    `reason` says why for every kind but `ok`; `error` is the run's own error when the run failed
    (also when probation then passed or rolled back); `probation` is what reporting the run did,
    None when nothing was reported."""

    kind: StepKind
    at: float
    rune: str | None = None
    sha256: str | None = None
    reason: str = ""
    error: str = ""
    outputs: int = 0
    latency_s: float | None = None
    probation: RunOutcome | None = None
    sink_error: str = ""


@dataclass(frozen=True)
class LoopStats:
    """The counters for the daemon's reports."""

    inferences: int
    failures: int
    waiting: int
    idle: int
    last_error: str
    last_error_at: float | None
    latency_samples: int
    latency_p50_s: float | None
    latency_p95_s: float | None
    rune: str | None
    input: str
    errors: dict[str, int] = field(default_factory=dict)


class RuneLoop:
    def __init__(
        self,
        state_dir: Path,
        slots: Slots,
        policy: AgentPolicy,
        config: RunConfig,
        *,
        limits: SandboxLimits | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.slots = slots
        self.policy = policy
        self.limits = limits or SandboxLimits()
        self._config = config
        self._pending: RunConfig | None = None
        self._config_lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._sources: LiveSources | None = None
        self._sink: OutputSink | None = None
        self._rune: tuple[str, LoadedRune] | None = None
        self._demand_of: str | None = None  # the rune the input's demand was measured on
        self._stats_lock = threading.Lock()
        self._inferences = self._failures = self._waits = self._idle = 0
        self._last_error = ""
        self._last_error_at: float | None = None
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._current_rune: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._errors: dict[str, int] = {}
        self.on_outputs: Callable[[SlotRune, bytes, list[OutputRecord]], None] | None = None

    # -- settings -----------------------------------------------------------------------------

    @property
    def config(self) -> RunConfig:
        """The settings in force (or about to be, from the next step)."""
        with self._config_lock:
            return self._pending or self._config

    def reconfigure(self, config: RunConfig) -> None:
        """Use `config` from the next step on."""
        with self._config_lock:
            self._pending = config
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(wake.set)

    def _apply_pending(self) -> None:
        with self._config_lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        old, self._config = self._config, pending
        if pending.input != old.input and self._sources is not None:
            self._sources.close()
            self._sources = None
            self._rune = None
        if self._sink is not None:
            if pending.sink.path != old.sink.path:
                self._sink.close()
                self._sink = None
            else:
                self._sink.max_bytes = pending.sink.max_bytes

    # -- one inference ------------------------------------------------------------------------

    def step(self, now: float) -> StepResult:
        """Run the active rune once on the next inputs (see the module's rules)."""
        with self._step_lock:
            self._apply_pending()
            result = self._step(now)
            self._count(result)
            return result

    def _step(self, now: float) -> StepResult:
        try:
            active = self.slots.active(now)
        except SlotError as exc:
            return StepResult(StepKind.FAILED, now, reason=f"cannot read the slots: {exc}")
        if active is None:
            self._rune = None
            return StepResult(StepKind.IDLE, now, reason="no rune is active")
        data, info = active
        sources = self._live_sources()
        rune = self._loaded(info, data, sources)
        if isinstance(rune, SandboxError):
            self._count_error(rune)
            return self._report(now, info, f"{info.ref} failed to load: {rune}")
        try:
            ready = sources.prepare()
        except SourceError as exc:
            return self._input_failed(now, info, exc)
        if not ready:
            return self._waiting(now, info, sources.pending_reason())
        sources.begin()
        started = time.perf_counter()
        try:
            records = rune.call()
        except InputPending as exc:
            sources.abort()
            self._rune = None
            return self._waiting(now, info, str(exc))
        except SourceError as exc:
            sources.commit()
            self._rune = None
            return self._input_failed(now, info, exc)
        except SandboxError as exc:
            sources.commit()
            self._rune = None
            self._count_error(exc)
            return self._report(now, info, f"{info.ref} failed: {exc}")
        latency = time.perf_counter() - started
        sources.commit()
        with self._stats_lock:
            self._latencies.append(latency)
        sink_error = ""
        try:
            self._output_sink().write(now, info.ref, records)
        except SinkError as exc:
            sink_error = str(exc)
        if self.on_outputs is not None:
            try:
                self.on_outputs(info, data, records)
            except Exception:
                log.exception("the outputs' observer failed")
        return self._report(now, info, "", outputs=len(records), latency=latency, sink=sink_error)

    def _report(
        self,
        now: float,
        info: SlotRune,
        error: str,
        *,
        outputs: int = 0,
        latency: float | None = None,
        sink: str = "",
    ) -> StepResult:
        """Report the run to probation; the step's result from what that did."""
        base = StepResult(
            StepKind.OK if not error else StepKind.FAILED,
            now,
            info.ref,
            info.sha256,
            reason=error,
            error=error,
            outputs=outputs,
            latency_s=latency,
            sink_error=sink,
        )
        try:
            outcome: RunResult = self.slots.record_run(not error, error, now)
        except SlotError as exc:
            reason = f"cannot record the run for probation: {exc}"
            return replace(base, kind=StepKind.FAILED, reason=reason)
        kind = base.kind
        reason = base.reason
        if outcome.outcome is RunOutcome.ROLLED_BACK:
            kind, reason = StepKind.ROLLED_BACK, outcome.reason
            self._rune = None
            log.warning("%s rolled back: %s", info.ref, outcome.reason)
        elif outcome.outcome is RunOutcome.PASSED:
            kind, reason = StepKind.PASSED_PROBATION, outcome.reason
        elif outcome.outcome is RunOutcome.FAILED:
            kind, reason = StepKind.FAILED, outcome.reason
        return replace(base, kind=kind, reason=reason, probation=outcome.outcome)

    def _input_failed(self, now: float, info: SlotRune, exc: SandboxError) -> StepResult:
        reason = f"the input failed, not the rune (not counted for probation): {exc}"
        return StepResult(StepKind.FAILED, now, info.ref, info.sha256, reason, error=str(exc))

    def _waiting(self, now: float, info: SlotRune, reason: str) -> StepResult:
        return StepResult(StepKind.WAITING, now, info.ref, info.sha256, reason)

    def _live_sources(self) -> LiveSources:
        if self._sources is None:
            self._sources = LiveSources(self._config.input)
            self._rune = None
        return self._sources

    def _output_sink(self) -> OutputSink:
        if self._sink is None:
            self._sink = OutputSink(self._config.sink.path, self._config.sink.max_bytes)
        return self._sink

    def _loaded(
        self, info: SlotRune, data: bytes, sources: LiveSources
    ) -> LoadedRune | SandboxError:
        if self._rune is not None and self._rune[0] == info.sha256:
            return self._rune[1]
        self._rune = None
        if self._demand_of != info.sha256:  # another rune: it may read other amounts
            sources.forget_demand()
            self._demand_of = info.sha256
        try:
            rune = load_rune(
                data,
                name=info.ref,
                limits=self.limits,
                sources=sources,
                allowed=self.policy.allowed_kinds(),
            )
        except SandboxError as exc:
            return exc
        self._rune = (info.sha256, rune)
        return rune

    # -- the loop -----------------------------------------------------------------------------

    async def run(
        self,
        stop: asyncio.Event,
        on_event: Callable[[StepResult], None] | None = None,
    ) -> None:
        """Step at the configured interval until `stop` is set; never ends on a failure."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._loop = loop
        try:
            while not stop.is_set():
                started = loop.time()
                result = await asyncio.to_thread(self._step_safely)
                if on_event is not None:
                    try:
                        on_event(result)
                    except Exception:
                        log.exception("the run loop's event handler failed")
                await self._pause(started, stop)
        finally:
            self._loop = None
            await asyncio.to_thread(self.close)

    def _step_safely(self) -> StepResult:
        now = time.time()
        try:
            return self.step(now)
        except Exception as exc:
            log.exception("a run loop step failed")
            result = StepResult(StepKind.FAILED, now, reason=f"internal error: {exc!r}")
            self._count(result)
            return result

    async def _pause(self, started: float, stop: asyncio.Event) -> None:
        """Until `started + interval_s` (the interval in force now), or until `stop`."""
        loop = asyncio.get_running_loop()
        wake = self._wake
        assert wake is not None
        while not stop.is_set():
            wake.clear()
            remaining = started + self.config.interval_s - loop.time()
            if remaining <= 0:
                return
            waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
            try:
                await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def close(self) -> None:
        """Close the input and the sink (a later step opens them again)."""
        with self._step_lock:
            if self._sources is not None:
                self._sources.close()
                self._sources = None
            if self._sink is not None:
                self._sink.close()
                self._sink = None
            self._rune = None

    # -- counters -----------------------------------------------------------------------------

    def _count(self, result: StepResult) -> None:
        with self._stats_lock:
            if result.rune is not None or result.kind is StepKind.IDLE:
                self._current_rune = result.rune
            self._idle += result.kind is StepKind.IDLE
            self._waits += result.kind is StepKind.WAITING
            self._inferences += result.latency_s is not None
            self._failures += bool(result.error) or result.kind is StepKind.FAILED
            problem = result.error or (result.reason if result.kind is StepKind.FAILED else "")
            problem = problem or result.sink_error
            if problem:
                self._last_error, self._last_error_at = problem, result.at

    def stats(self) -> LoopStats:
        with self._stats_lock:
            latencies = sorted(self._latencies)
            return LoopStats(
                inferences=self._inferences,
                failures=self._failures,
                waiting=self._waits,
                idle=self._idle,
                last_error=self._last_error,
                last_error_at=self._last_error_at,
                latency_samples=len(latencies),
                latency_p50_s=_percentile(latencies, 50),
                latency_p95_s=_percentile(latencies, 95),
                rune=self._current_rune,
                input=self.config.input.describe(),
                errors=dict(self._errors),
            )

    def _count_error(self, exc: SandboxError) -> None:
        kind = re.sub(r"(?<!^)(?=[A-Z])", "-", type(exc).__name__).lower()
        with self._stats_lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1


def _percentile(ordered: list[float], percent: float) -> float | None:
    """Nearest-rank percentile of sorted values; None when there are none."""
    if not ordered:
        return None
    rank = max(1, math.ceil(percent / 100 * len(ordered)))
    return ordered[rank - 1]
