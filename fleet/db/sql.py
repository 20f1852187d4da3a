"""Raw SQL for the hot paths the ORM would take a round trip per row for.

The command channel's bulk statements (`UPDATE ... WHERE id IN (...) RETURNING ...`) are written
here once for both databases. Tortoise builds each ORM query through pypika (about 0.3 ms of CPU a
statement on this machine) and has no `RETURNING` on updates; a raw statement costs a third of
that, and one statement over 500 rows about what three ORM statements cost.

Rules:
- Statements are written with `?` placeholders, never with values in the text: what is formatted
  into one is a constant column name or `marks()` (hence the `noqa: S608` where they are built).
  For PostgreSQL each `?` becomes `$1`, `$2`, ... (so no statement may hold a literal `?`).
- A statement runs on the connection of the caller's transaction when there is one (Tortoise
  keeps it in a context variable), else on its own.
- Values are what the ORM would bind: a `datetime` is adapted by the driver (on SQLite by
  Tortoise's adapter, the text the ORM writes), so raw and ORM writes compare alike.
- Lists of ids are sent in chunks of at most `CHUNK` (far below either database's limit on
  bound parameters).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from tortoise import connections
from tortoise.backends.base.client import BaseDBAsyncClient

CHUNK = 500
Item = TypeVar("Item")


def connection() -> BaseDBAsyncClient:
    """The current connection: the caller's transaction if it is in one."""
    client: BaseDBAsyncClient = connections.get("default")
    return client


def is_postgres(client: BaseDBAsyncClient | None = None) -> bool:
    return (client or connection()).capabilities.dialect == "postgres"


def marks(count: int) -> str:
    """`?, ?, ...` for `count` values."""
    return ", ".join("?" * count)


def for_dialect(sql: str, client: BaseDBAsyncClient) -> str:
    if not is_postgres(client):
        return sql
    numbers = itertools.count(1)
    parts = sql.split("?")
    return parts[0] + "".join(f"${next(numbers)}{part}" for part in parts[1:])


async def fetch(sql: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    """Run one statement (with `RETURNING` or a `SELECT`) and return its rows."""
    client = connection()
    return await client.execute_query_dict(for_dialect(sql, client), list(values))


async def execute_many(sql: str, rows: Sequence[Sequence[Any]]) -> None:
    """Run one statement once per row of values, in one round trip."""
    if not rows:
        return
    client = connection()
    await client.execute_many(for_dialect(sql, client), [list(row) for row in rows])


def chunks(items: Sequence[Item], size: int = CHUNK) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
