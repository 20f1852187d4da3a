"""The running controller's shared state: config, repository, metrics, and the renewal schedule.

Rules:
- The renewal task wakes before the earliest online role is due (at least every minute, and at
  least every half of the shortest online lifetime, since a change re-signs roles between
  wake-ups) and re-signs what is due; a failure is logged and retried, never fatal, since an
  unrenewed timestamp only expires hours later.
- Device keys are looked up in the database and cached; registering a device updates the cache,
  and any change of a device's state (approve, reject, remove) calls `forget_device`.
- The fleet CA (`ca`) and the attestation key (`attestation`) are loaded, or made for a fleet
  created before they existed, when the controller starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from securesystemslib.signer import SSlibKey

from attestation.keys import key_from_raw
from fleet.attestation import AttestationService
from fleet.ca import FleetCA
from fleet.db.models import Device, Rune
from fleet.fleetdir import FleetConfig, FleetDir
from fleet.logs import log
from fleet.metrics import Metrics
from fleet.outbox import Outbox
from fleet.tuf_store import FleetRepository, utcnow
from ota.repository import ONLINE_ROLES, TOP_LEVEL_ROLES

if TYPE_CHECKING:
    from fleet.audit_log import AuditLog
    from fleet.scheduler import Scheduler
    from fleet.telemetry.service import TelemetryService

RENEWAL_MAX_SLEEP_S = 60.0


@dataclass
class Controller:
    fleet_dir: FleetDir
    config: FleetConfig
    repository: FleetRepository
    metrics: Metrics = field(default_factory=Metrics)
    version: str = "0"
    # The broker URL handed to enrolling devices when fleet.yaml names none (set by `serve`).
    device_broker_url: str | None = None
    # The command outbox (set by `serve` once the broker link exists).
    outbox: Outbox | None = None
    # The rollout scheduler (set by `serve` once the broker link exists).
    scheduler: Scheduler | None = None
    # Telemetry's ingest, retention and gauges (set by `serve`).
    telemetry: TelemetryService | None = None
    # The audit log (set by `serve`; None: nothing is recorded).
    audit: AuditLog | None = None
    _device_keys: dict[str, SSlibKey] = field(default_factory=dict)
    _renewal: asyncio.Task[None] | None = None

    async def device_key(self, device_id: str) -> SSlibKey | None:
        key = self._device_keys.get(device_id)
        if key is not None:
            return key
        device = await Device.get_or_none(id=device_id)
        if device is None or device.state != "enrolled":
            return None
        key = key_from_raw(bytes.fromhex(device.public_key))
        self._device_keys[device_id] = key
        return key

    def forget_device(self, device_id: str) -> None:
        self._device_keys.pop(device_id, None)

    @functools.cached_property
    def attestation(self) -> AttestationService:
        """Challenges, appraisal and results, with the fleet's attestation key (made on first
        use)."""
        _, ttl, deploy_age = self.config.attestation_times()
        return AttestationService.open(
            self.fleet_dir.key_file("attestation"),
            self.config.name,
            ttl,
            deploy_age,
            self.metrics.registry,
        )

    @functools.cached_property
    def ca(self) -> FleetCA:
        """The fleet CA (made on first use if the fleet has none yet)."""
        return FleetCA.load_or_create(self.fleet_dir.keys, self.config.name)

    async def update_gauges(self) -> None:
        repo = self.repository.repository
        for role in TOP_LEVEL_ROLES:
            md = getattr(repo, role)
            self.metrics.metadata_version.labels(role).set(md.signed.version)
            self.metrics.metadata_expiry.labels(role).set(md.signed.expires.timestamp())
        self.metrics.runes_published.set(await Rune.filter(revoked_at=None).count())

    async def renew_once(self, now: datetime) -> None:
        files = await self.repository.refresh(now)
        for file in files:
            self.metrics.metadata_resigned.labels(file.role).inc()
            log("tuf.resigned", role=file.role, version=file.version)
        await self.update_gauges()

    async def _renewal_loop(self) -> None:
        while True:
            try:
                await self.renew_once(utcnow())
                repo = self.repository.repository
                due = repo.next_renewal()
                # A push or revoke re-signs roles while we sleep: wake within half a lifetime.
                shortest = min(repo.lifetimes.of(role) for role in ONLINE_ROLES).total_seconds()
                wait = min(
                    max((due - utcnow()).total_seconds(), 1.0),
                    RENEWAL_MAX_SLEEP_S,
                    max(shortest / 2, 1.0),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log("tuf.renewal_failed", logging.ERROR, error=str(exc))
                wait = 10.0
            await asyncio.sleep(wait)

    def start(self) -> None:
        subject = self.ca.certificate.subject.rfc4514_string()  # made now if the fleet has none
        log("ca.ready", certificate=str(self.fleet_dir.ca_cert), subject=subject)
        log("attestation.ready", key=self.attestation.public_key.keyid)
        self._renewal = asyncio.create_task(self._renewal_loop(), name="tuf-renewal")

    async def stop(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewal
            self._renewal = None
