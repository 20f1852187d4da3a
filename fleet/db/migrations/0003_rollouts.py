import functools
from json import dumps, loads
from typing import Any

from tortoise import fields, migrations
from tortoise.migrations import operations as ops
from tortoise.migrations.schema_editor.sqlite import SqliteSchemaEditor


class AlterFieldUnlessSqlite(ops.AlterField):
    """Alter the column where its length is enforced. SQLite ignores VARCHAR lengths, and its
    table rebuild would drop the table's indexes, so there only the migration state changes."""

    async def database_forward(
        self, app_label: str, old_state: Any, new_state: Any, state_editor: Any = None
    ) -> None:
        if isinstance(state_editor, SqliteSchemaEditor):
            return
        await super().database_forward(app_label, old_state, new_state, state_editor)

    async def database_backward(
        self, app_label: str, old_state: Any, new_state: Any, state_editor: Any = None
    ) -> None:
        if isinstance(state_editor, SqliteSchemaEditor):
            return
        await super().database_backward(app_label, old_state, new_state, state_editor)


def _json(**kwargs: Any) -> fields.JSONField[Any]:
    return fields.JSONField(
        encoder=functools.partial(dumps, separators=(",", ":")), decoder=loads, **kwargs
    )


class Migration(migrations.Migration):
    dependencies = [("fleet", "0002_enrollment")]

    initial = False

    operations = [
        ops.CreateModel(
            name="Rollout",
            fields=[
                (
                    "id",
                    fields.CharField(primary_key=True, unique=True, db_index=True, max_length=16),
                ),
                ("org", fields.CharField(max_length=64)),
                ("rune_name", fields.CharField(max_length=64)),
                ("rune_version", fields.CharField(max_length=64)),
                ("rune_target", fields.CharField(max_length=255)),
                ("selector", _json(default=dict)),
                ("devices", _json(null=True)),
                ("options", _json()),
                ("selected", fields.IntField(default=0)),
                ("state", fields.CharField(db_index=True, max_length=16)),
                ("reason", fields.TextField(null=True, unique=False)),
                ("machine", _json()),
                ("version", fields.IntField(default=0)),
                ("created_by", fields.CharField(max_length=64)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ("updated_at", fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ("started_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                (
                    "finished_at",
                    fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
                ),
            ],
            options={
                "table": "rollout",
                "app": "fleet",
                "pk_attr": "id",
                "table_description": "A rollout of one rune version to a selector, in waves.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="RolloutDevice",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("rollout_id", fields.CharField(db_index=True, max_length=16)),
                ("device_id", fields.CharField(db_index=True, max_length=40)),
                ("wave", fields.IntField(null=True)),
                ("previous_rune", fields.CharField(null=True, max_length=255)),
                (
                    "notified_at",
                    fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
                ),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={
                "table": "rollout_device",
                "app": "fleet",
                "unique_together": (("rollout_id", "device_id"),),
                "pk_attr": "id",
                "table_description": "A device a rollout selected (at creation) or drew (when a wave started).",
            },
            bases=["Model"],
        ),
        # Rollout command ids are `{rollout id}.{device id}.{attempt}`: longer than a uuid4 hex.
        AlterFieldUnlessSqlite(
            model_name="Command",
            name="id",
            field=fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64),
        ),
    ]
