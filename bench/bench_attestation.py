"""Attestation: the verifier's appraisals per second against the raw Ed25519 verify rate, and the
time attesting adds to a deploy.

1. **Appraisals**, on one core, in this process: `attestation.verifier.Verifier.appraise` on real
   evidence (the agent's own `SoftwareEvidence` of this install: its real manifest digest and
   effective config, an active and a previous rune) signed by a device key, against reference
   values like a fleet's (`--releases` agent releases, `--runes` runes, two config
   constraints). An appraisal opens the envelope (one Ed25519 verify, with the key the device
   enrolled with), runs the five checks and signs the result (one Ed25519 signature).
   Baseline, in the same run and interleaved in batches of `BATCH`: the raw Ed25519 verify
   (`cryptography`, the key object already loaded) of the same signed bytes. The target is at
   least 50% of the raw rate.
2. **A deploy's added time**: a real controller (`fleetctl init` and `serve`, SQLite, a
   `mosquitto` of the bench's own), one registered device, and `--attests` times what the agent
   does before each deploy (`agent.attester.Attester.attest`: a signed POST for a challenge,
   the evidence produced and signed, a signed POST of it, the appraisal with its database work,
   the result stored). Reported: wall time (median, p90), the evidence production alone, and the
   controller's CPU per attestation.

Run: `.venv/bin/python -m bench.bench_attestation` (`--rounds`, `--per-round`, `--attests`,
`-o json`). It takes about a minute and removes what it made.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from rich.table import Table
from securesystemslib.dsse import Envelope
from securesystemslib.signer import CryptoSigner

from agent.attester import SoftwareEvidence, attester_for, effective_config
from agent.update import agent_version
from attestation.evidence import RuneClaim, seal_evidence
from attestation.identity import DeviceIdentity
from attestation.keys import raw_public_bytes
from attestation.verifier import Challenge, ReferenceValues, Verifier
from bench.bench_fleet import BenchError, Sampler, controller, percentile, private_broker

TARGET_RATIO = 0.5
BATCH = 50


@dataclass
class Result:
    rounds: int
    per_round: int
    evidence_bytes: int
    raw_verifies_per_s: list[float] = field(default_factory=list)
    appraisals_per_s: list[float] = field(default_factory=list)
    attest_ms: list[float] = field(default_factory=list)
    produce_ms: list[float] = field(default_factory=list)
    controller_cpu_ms_per_attest: float | None = None

    @property
    def raw_median(self) -> float:
        return statistics.median(self.raw_verifies_per_s)

    @property
    def appraisal_median(self) -> float:
        return statistics.median(self.appraisals_per_s)

    @property
    def ratio(self) -> float:
        return self.appraisal_median / self.raw_median

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "raw_median": self.raw_median,
            "appraisal_median": self.appraisal_median,
            "ratio": self.ratio,
            "target_ratio": TARGET_RATIO,
            "met": self.ratio >= TARGET_RATIO,
            "attest_median_ms": statistics.median(self.attest_ms) if self.attest_ms else None,
            "attest_p90_ms": percentile(self.attest_ms, 90),
            "produce_median_ms": statistics.median(self.produce_ms) if self.produce_ms else None,
        }


def appraisal_fixture(state_dir: Path, releases: int, runes: int) -> tuple[Any, ...]:
    """A device, its signed evidence, the challenge and reference values like a fleet's."""
    identity = DeviceIdentity.load_or_create(state_dir)
    active = RuneClaim("acme/sine@1.0.0", hashlib.sha256(b"active").hexdigest())
    previous = RuneClaim("acme/sine@0.9.0", hashlib.sha256(b"previous").hexdigest())
    producer = SoftwareEvidence(
        identity,
        agent_version(),
        lambda: effective_config(state_dir, "http://controller.example:8470"),
        lambda: (active, previous),
    )
    nonce = os.urandom(16).hex()
    evidence = producer.produce(nonce)
    sealed = seal_evidence(evidence, identity.signer)
    published = {hashlib.sha256(str(i).encode()).hexdigest() for i in range(runes)}
    reference = ReferenceValues(
        agent={
            f"0.{i}.0": frozenset({hashlib.sha256(f"release {i}".encode()).hexdigest()})
            for i in range(releases)
        }
        | {evidence.agent_version: frozenset({evidence.agent_sha256})},
        runes_current=frozenset(published | {active.sha256}),
        runes_known=frozenset(published | {active.sha256, previous.sha256}),
        config={"policy.allow_downgrade": False, "policy.health_check_calls": 3},
    )
    return identity, sealed, Challenge(nonce, identity.device_id), reference


def measure_appraisals(result: Result, releases: int, runes: int, scratch: Path) -> None:
    identity, sealed, challenge, reference = appraisal_fixture(scratch / "device", releases, runes)
    verifier = Verifier(CryptoSigner.generate_ed25519(), "bench", result_ttl_s=7200)
    key = identity.public_key
    now = time.time()
    # The raw baseline: the same signature over the same bytes the appraisal verifies.
    envelope = Envelope.from_dict(json.loads(sealed))
    signature = bytes.fromhex(next(iter(envelope.signatures.values())).signature)
    pae = envelope.pae()
    raw = Ed25519PublicKey.from_public_bytes(raw_public_bytes(key))
    raw.verify(signature, pae)  # the baseline verifies what the appraisal verifies
    result.evidence_bytes = len(sealed)
    batches = max(1, result.per_round // BATCH)
    for _ in range(result.rounds):
        # Small batches in turn, so that both see the same moments of a noisy machine.
        raw_s = appraise_s = 0.0
        for _ in range(batches):
            started = time.perf_counter()
            for _ in range(BATCH):
                raw.verify(signature, pae)
            middle = time.perf_counter()
            for _ in range(BATCH):
                verifier.appraise(sealed, key, challenge, reference, now)
            raw_s += middle - started
            appraise_s += time.perf_counter() - middle
        result.raw_verifies_per_s.append(batches * BATCH / raw_s)
        result.appraisals_per_s.append(batches * BATCH / appraise_s)


def measure_deploy_cost(result: Result, attests: int, scratch: Path, console: Console) -> None:
    with contextlib.ExitStack() as stack:
        mqtt_url, _ = stack.enter_context(private_broker(scratch))
        ctl = stack.enter_context(controller(scratch, mqtt_url, "warning"))
        sampler = stack.enter_context(Sampler())
        sampler.pids["controller"] = ctl.process.pid
        state_dir = scratch / "attester"
        identity = DeviceIdentity.load_or_create(state_dir)
        ctl.api.call(
            "POST", "/api/v1/devices", {"public_key": raw_public_bytes(identity.public_key).hex()}
        )
        attester = attester_for(state_dir, ctl.url)
        attester.attest()  # the first measures the code; a running agent has done so already
        with console.status(f"{attests} attestations against a real controller"):
            start = sampler.snapshot()
            for _ in range(attests):
                began = time.perf_counter()
                result_ = attester.attest()
                result.attest_ms.append((time.perf_counter() - began) * 1000)
                if result_.status.label != "affirming":
                    raise BenchError(f"the bench device attested {result_.status.label}")
            end = sampler.snapshot()
        cpu = start.cpu(end, "controller")
        if cpu is not None:
            result.controller_cpu_ms_per_attest = cpu / attests * 1000
        producer = attester.producer
        for _ in range(attests):
            began = time.perf_counter()
            producer.produce(os.urandom(16).hex())
            result.produce_ms.append((time.perf_counter() - began) * 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_attestation", description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--releases", type=int, default=5, help="agent releases referenced")
    parser.add_argument("--runes", type=int, default=100, help="runes published")
    parser.add_argument("--attests", type=int, default=200, help="attestations of one device")
    parser.add_argument("-o", "--output", choices=("text", "json"), default="text")
    args = parser.parse_args(argv)
    as_json = args.output == "json"
    console = Console(stderr=True) if as_json else Console()
    result = Result(args.rounds, args.per_round, 0)
    try:
        with tempfile.TemporaryDirectory(prefix="fleet-bench-attestation-") as scratch:
            with console.status("appraisals and raw verifies, interleaved"):
                measure_appraisals(result, args.releases, args.runes, Path(scratch))
            measure_deploy_cost(result, args.attests, Path(scratch), console)
    except BenchError as exc:
        console.print(f"[red]bench failed:[/red] {exc}", highlight=False)
        return 1
    data = result.to_json()
    if as_json:
        print(json.dumps(data))
        return 0
    table = Table(title=f"Attestation ({os.cpu_count()} cores, one used for 1.)")
    table.add_column("")
    table.add_column("result", justify="right")
    table.add_row("evidence envelope (bytes)", f"{result.evidence_bytes:,}")
    table.add_row("raw Ed25519 verifies / s (median)", f"{result.raw_median:,.0f}")
    table.add_row("[bold]appraisals / s (median)[/bold]", f"{result.appraisal_median:,.0f}")
    table.add_row(
        "  per round, appraisals / raw",
        ", ".join(
            f"{a / r:.2f}"
            for a, r in zip(result.appraisals_per_s, result.raw_verifies_per_s, strict=True)
        ),
    )
    table.add_row("one appraisal (us)", f"{1e6 / result.appraisal_median:.0f}")
    table.add_row(
        "attest() against a controller, median / p90 (ms)",
        f"{data['attest_median_ms']:.1f} / {data['attest_p90_ms']:.1f}",
    )
    table.add_row("  producing the evidence (ms)", f"{data['produce_median_ms']:.2f}")
    cpu = result.controller_cpu_ms_per_attest
    table.add_row("  controller CPU per attestation (ms)", "-" if cpu is None else f"{cpu:.2f}")
    console.print(table)
    verdict = "[green]met[/green]" if data["met"] else "[red]NOT met[/red]"
    console.print(
        f"appraisals run at {result.ratio:.2f}x the raw Ed25519 verify rate "
        f"(target >= {TARGET_RATIO:.2f}x): {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
