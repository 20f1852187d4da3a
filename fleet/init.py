"""`fleetctl init`: create a fleet: keys, the fleet CA, the first TUF metadata, the database and an
admin token.

Rules:
- Refuses to touch an existing fleet (a `fleet.yaml`, or a database that already holds TUF
  metadata); nothing is overwritten.
- Root keys (k of n) go to `offline/`, apart from the online keys in `keys/`; the caller warns the
  operator to move them off the machine. The fleet CA (key and certificate) goes to `keys/` too.
- The admin token is returned once and stored only as a hash.
- If any step fails, everything this run created is removed again (keys, blobs, root.json, the
  SQLite file): no half-made fleet. The config file, which makes a directory a fleet, is written
  last.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tortoise.exceptions import BaseORMException

from attestation.keys import generate_key_file
from fleet.blobs import BlobStore
from fleet.ca import FleetCA
from fleet.db import DatabaseError, close_database, open_database
from fleet.db.models import ApiToken, TufFile
from fleet.fleetdir import ONLINE_KEYS, FleetConfig, FleetDir, FleetDirError
from fleet.tokens import hash_token, new_token
from fleet.tuf_store import FleetRepository, utcnow
from ota.repository import ONLINE_ROLES, Repository


@dataclass(frozen=True)
class InitResult:
    fleet_dir: Path
    config_file: Path
    root_json: Path
    offline_keys: list[Path]
    online_keys: dict[str, Path]
    db_url: str
    admin_token: str
    root_threshold: int
    ca_cert: Path


async def create_fleet(
    fleet_dir: FleetDir,
    *,
    root_keys: int = 3,
    root_threshold: int = 2,
    db_url: str | None = None,
    name: str = "fleet",
) -> InitResult:
    if fleet_dir.exists():
        raise FleetDirError(f"{fleet_dir.path} is already a fleet; refusing to overwrite it")
    if not 1 <= root_threshold <= root_keys:
        raise FleetDirError(
            f"--root-threshold must be between 1 and --root-keys ({root_keys}), not "
            f"{root_threshold}"
        )
    for sub in (fleet_dir.keys, fleet_dir.offline):
        if sub.exists() and any(sub.iterdir()):
            raise FleetDirError(f"{sub} already holds files; refusing to overwrite keys")
    created_dir = not fleet_dir.path.exists()
    sqlite_file = fleet_dir.path / "fleet.sqlite3"
    ours = [fleet_dir.keys, fleet_dir.offline, fleet_dir.blobs, fleet_dir.root_json]
    if db_url is None:
        ours.append(sqlite_file)
    made = [path for path in ours if not path.exists()]
    try:
        fleet_dir.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        for sub in (fleet_dir.keys, fleet_dir.offline):
            sub.mkdir(exist_ok=True, mode=0o700)
        offline_paths = [fleet_dir.offline / f"root-{i + 1}.pem" for i in range(root_keys)]
        root_signers = [generate_key_file(p) for p in offline_paths]
        online_paths = {role: fleet_dir.key_file(role) for role in ONLINE_KEYS}
        signers = {role: generate_key_file(p) for role, p in online_paths.items()}
        FleetCA.load_or_create(fleet_dir.keys, name)
        now = utcnow()
        config = FleetConfig(
            name=name, db_url=db_url, root_keys=root_keys, root_threshold=root_threshold
        )
        repo, files = Repository.create(
            root_signers,
            root_threshold,
            {role: signers[role] for role in ONLINE_ROLES},
            now,
            config.lifetimes(),
        )
        fleet_dir.root_json.write_bytes(files[0].data)
        url = db_url or fleet_dir.default_db_url()
        token = new_token()
        await open_database(url)
        try:
            if await TufFile.all().exists():
                raise FleetDirError(
                    "the database already holds a fleet's metadata; use an empty database "
                    "or --db-url for a new one"
                )
            store = FleetRepository(fleet_dir, repo, BlobStore(fleet_dir.blobs))
            await store.store(files)
            await store.publish_command_key(now)
            await ApiToken.create(name="admin", role="admin", token_hash=hash_token(token))
        except BaseORMException as exc:
            raise DatabaseError(f"could not set up the database: {exc}") from None
        finally:
            await close_database()
        fleet_dir.config_file.write_text(config.to_yaml())
    except BaseException:
        if created_dir:
            shutil.rmtree(fleet_dir.path, ignore_errors=True)
        else:
            for path in made:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
    return InitResult(
        fleet_dir=fleet_dir.path,
        config_file=fleet_dir.config_file,
        root_json=fleet_dir.root_json,
        offline_keys=offline_paths,
        online_keys=online_paths,
        db_url=url,
        admin_token=token,
        root_threshold=root_threshold,
        ca_cert=fleet_dir.ca_cert,
    )
