"""A fleet's directory on the controller host, and its config file.

Layout (made by `fleetctl init`):

    fleet.yaml          the config: listen address, database URL, metadata lifetimes
    root.json           the first TUF root: provision devices with it
    keys/               online keys (timestamp, snapshot, targets, command), mode 0600, and
                        the fleet CA (ca.pem, 0600, and its certificate ca.crt); audit.key
                        (made by the first `serve`) keys the audit log's chain
    offline/            the root keys: move them off this machine after `init`
    blobs/sha256/       rune files, content-addressed
    fleet.sqlite3       the database, unless `db_url` points elsewhere

Rules: a directory without `fleet.yaml` is not a fleet (`FleetDirError` says to run `fleetctl
init`); the config is validated when loaded and a bad value is named with its key. Durations
(`device_cert_lifetime`, `attestation_interval`, `attestation_ttl`, `deploy_attestation_age`) are
seconds or a number with a unit (`90s`, `30m`, `24h`, `7d`).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from ota.repository import Lifetimes

CONFIG_FILE = "fleet.yaml"
DEFAULT_DIR = Path("fleet")
DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_MQTT_LISTEN = "127.0.0.1:1884"
ONLINE_KEYS = ("targets", "snapshot", "timestamp", "command")
DEVICE_CERT_LIFETIME_MIN = timedelta(minutes=5)
DEVICE_CERT_LIFETIME_MAX = timedelta(days=90)
BROKER_SCHEMES = ("mqtt", "mqtts", "ws", "wss")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


class FleetDirError(Exception):
    """A fleet directory or config file that cannot be used."""


def parse_duration(value: object) -> timedelta:
    """Seconds (a number) or a number with a unit s, m, h or d; ValueError when it is neither."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration (seconds, or like 90s, 30m, 24h, 7d)")
    if not 0 < seconds < 1e10:  # also refuses NaN, and what a timedelta cannot hold
        raise ValueError(f"{value!r} is not a positive duration")
    return timedelta(seconds=seconds)


@dataclass
class FleetConfig:
    name: str = "fleet"
    listen: str = DEFAULT_LISTEN
    # The embedded MQTT broker's address (when no broker URL is given); dev and demo only.
    mqtt_listen: str = DEFAULT_MQTT_LISTEN
    # An external MQTT broker for the controller's link (`--mqtt-url` / FLEET_MQTT_URL win).
    mqtt_url: str | None = None
    db_url: str | None = None
    root_threshold: int = 2
    root_keys: int = 3
    lifetimes_hours: dict[str, float] = field(
        default_factory=lambda: {
            "root": 365 * 24.0,
            "targets": 30 * 24.0,
            "snapshot": 24.0,
            "timestamp": 6.0,
        }
    )
    min_agent_version: str = "0.1.0"
    max_rune_bytes: int = 32 * 1024 * 1024
    # How long a device certificate from the fleet CA is valid; agents renew at 2/3 of it.
    device_cert_lifetime: int | float | str = "24h"
    # The MQTT broker URL handed to devices at enrollment; None: the controller fills it in.
    device_broker_url: str | None = None
    # How often the controller asks each online device to attest, and how long a result stays
    # fresh (a device without a fresh affirming result is ineligible for rollouts and downloads).
    attestation_interval: int | float | str = "1h"
    attestation_ttl: int | float | str = "2h"
    # How old an affirming result may be when it is presented for a rune download: every deploy is
    # backed by an attestation at most this old (the agent attests again before a deploy if not).
    deploy_attestation_age: int | float | str = "10m"

    def lifetimes(self) -> Lifetimes:
        return Lifetimes(**{role: timedelta(hours=h) for role, h in self.lifetimes_hours.items()})

    def cert_lifetime(self) -> timedelta:
        """`device_cert_lifetime` as a timedelta (validated when the config was loaded)."""
        return parse_duration(self.device_cert_lifetime)

    def attestation_times(self) -> tuple[timedelta, timedelta, timedelta]:
        """(`attestation_interval`, `attestation_ttl`, `deploy_attestation_age`), validated when
        the config was loaded."""
        return (
            parse_duration(self.attestation_interval),
            parse_duration(self.attestation_ttl),
            parse_duration(self.deploy_attestation_age),
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    @classmethod
    def from_mapping(cls, data: Any, source: str) -> FleetConfig:
        if not isinstance(data, dict):
            raise FleetDirError(f"{source}: expected a mapping of settings")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise FleetDirError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        config = cls(**data)
        lifetimes = config.lifetimes_hours
        if not isinstance(lifetimes, dict) or set(lifetimes) != {
            "root",
            "targets",
            "snapshot",
            "timestamp",
        }:
            raise FleetDirError(
                f"{source}: lifetimes_hours needs root, targets, snapshot and timestamp"
            )
        for role, hours in lifetimes.items():
            if not isinstance(hours, int | float) or hours <= 0:
                raise FleetDirError(f"{source}: lifetimes_hours.{role} must be a positive number")
        if not isinstance(config.max_rune_bytes, int) or config.max_rune_bytes <= 0:
            raise FleetDirError(f"{source}: max_rune_bytes must be a positive integer")
        try:
            lifetime = parse_duration(config.device_cert_lifetime)
        except ValueError as exc:
            raise FleetDirError(f"{source}: device_cert_lifetime: {exc}") from None
        if not DEVICE_CERT_LIFETIME_MIN <= lifetime <= DEVICE_CERT_LIFETIME_MAX:
            raise FleetDirError(
                f"{source}: device_cert_lifetime must be between 5m and 90d, not "
                f"{config.device_cert_lifetime!r}"
            )
        try:
            interval, ttl, deploy_age = config.attestation_times()
        except ValueError as exc:
            raise FleetDirError(
                f"{source}: attestation_interval, attestation_ttl or deploy_attestation_age: {exc}"
            ) from None
        if deploy_age > ttl:
            raise FleetDirError(
                f"{source}: deploy_attestation_age ({config.deploy_attestation_age}) cannot be "
                f"longer than attestation_ttl ({config.attestation_ttl})"
            )
        if ttl <= interval:
            raise FleetDirError(
                f"{source}: attestation_ttl ({config.attestation_ttl}) must be longer than "
                f"attestation_interval ({config.attestation_interval}), or results lapse between "
                "attestations"
            )
        broker = config.device_broker_url
        if broker is not None and (
            not isinstance(broker, str)
            or urlsplit(broker).scheme not in BROKER_SCHEMES
            or not urlsplit(broker).hostname
        ):
            raise FleetDirError(
                f"{source}: device_broker_url must be an mqtt://, mqtts://, ws:// or wss:// URL "
                f"with a host, not {broker!r}"
            )
        return config


@dataclass(frozen=True)
class FleetDir:
    path: Path

    @classmethod
    def from_option(cls, value: Path | None) -> FleetDir:
        if value is not None:
            return cls(value)
        env = os.environ.get("FLEET_DIR")
        return cls(Path(env) if env else DEFAULT_DIR)

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def keys(self) -> Path:
        return self.path / "keys"

    @property
    def offline(self) -> Path:
        return self.path / "offline"

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    @property
    def root_json(self) -> Path:
        return self.path / "root.json"

    def key_file(self, role: str) -> Path:
        return self.keys / f"{role}.pem"

    @property
    def ca_key(self) -> Path:
        """The fleet CA's private key (see `fleet.ca`)."""
        return self.keys / "ca.pem"

    @property
    def ca_cert(self) -> Path:
        """The fleet CA's certificate: brokers and devices trust it for MQTT mTLS."""
        return self.keys / "ca.crt"

    def default_db_url(self) -> str:
        return f"sqlite://{(self.path / 'fleet.sqlite3').resolve()}"

    def exists(self) -> bool:
        return self.config_file.exists()

    def load_config(self) -> FleetConfig:
        if not self.exists():
            raise FleetDirError(
                f"{self.path} is not a fleet (no {CONFIG_FILE}); create one with "
                f"`fleetctl init --dir {self.path}`"
            )
        try:
            data = yaml.safe_load(self.config_file.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise FleetDirError(f"{self.config_file}: cannot read it ({exc})") from None
        try:
            return FleetConfig.from_mapping(data, str(self.config_file))
        except TypeError as exc:
            raise FleetDirError(f"{self.config_file}: {exc}") from None

    def db_url(self, override: str | None = None) -> str:
        if override:
            return override
        env = os.environ.get("FLEET_DB_URL")
        if env:
            return env
        return self.load_config().db_url or self.default_db_url()
