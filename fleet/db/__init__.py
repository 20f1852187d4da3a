"""The controller's database: Tortoise ORM on SQLite (default) or PostgreSQL.

Rules:
- One database per process, named by a URL: `sqlite:///path` or `postgres://...`.
- The schema is changed only by the committed migrations in `fleet.db.migrations`, applied by
  `open_database` at every start (an up-to-date database is left alone).
- A database that cannot be reached is a `DatabaseError` naming the URL (without its password)
  and the cause, never a driver traceback.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tortoise import Tortoise
from tortoise.migrations.api import migrate

APP = "fleet"


class DatabaseError(Exception):
    """The database could not be opened or migrated."""


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def postgres_dsn(db_url: str | None) -> str | None:
    """The asyncpg DSN of a PostgreSQL database URL (for a connection of one's own, such as an
    advisory lock's); None for any other database."""
    if db_url is None or not db_url.startswith(("postgres://", "postgresql://", "asyncpg://")):
        return None
    parts = urlsplit(db_url)
    return urlunsplit(parts._replace(scheme="postgresql", query=""))


def tortoise_config(db_url: str) -> dict[str, Any]:
    return {
        "connections": {"default": db_url},
        "apps": {
            APP: {
                "models": ["fleet.db.models"],
                "default_connection": "default",
                "migrations": "fleet.db.migrations",
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


async def open_database(db_url: str) -> None:
    """Connect, apply pending migrations, and leave Tortoise ready for queries."""
    config = tortoise_config(db_url)
    try:
        await migrate(config=config)
        await Tortoise.close_connections()
        await Tortoise.init(config=config)
    except (OSError, ConnectionError) as exc:
        raise DatabaseError(f"cannot reach the database {redact(db_url)}: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("tortoise", "asyncpg", "sqlite3", "aiosqlite")):
            raise DatabaseError(f"database {redact(db_url)}: {exc}") from None
        raise


async def close_database() -> None:
    await Tortoise.close_connections()
