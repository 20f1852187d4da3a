"""A fleet's directory on the controller host, and its config file.

Layout (made by `fleetctl init`):

    fleet.yaml          the config: listen address, database URL, metadata lifetimes
    root.json           the first TUF root: provision devices with it
    keys/               online keys (timestamp, snapshot, targets, command), mode 0600
    offline/            the root keys: move them off this machine after `init`
    blobs/sha256/       rune files, content-addressed
    fleet.sqlite3       the database, unless `db_url` points elsewhere

Rules: a directory without `fleet.yaml` is not a fleet (`FleetDirError` says to run `fleetctl
init`); the config is validated when loaded and a bad value is named with its key.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from ota.repository import Lifetimes

CONFIG_FILE = "fleet.yaml"
DEFAULT_DIR = Path("fleet")
DEFAULT_LISTEN = "127.0.0.1:8470"
ONLINE_KEYS = ("targets", "snapshot", "timestamp", "command")


class FleetDirError(Exception):
    """A fleet directory or config file that cannot be used."""


@dataclass
class FleetConfig:
    name: str = "fleet"
    listen: str = DEFAULT_LISTEN
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

    def lifetimes(self) -> Lifetimes:
        return Lifetimes(**{role: timedelta(hours=h) for role, h in self.lifetimes_hours.items()})

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
