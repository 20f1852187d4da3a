import functools
from json import dumps, loads

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name="ApiToken",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("name", fields.CharField(max_length=64)),
                ("role", fields.CharField(max_length=16)),
                ("token_hash", fields.CharField(unique=True, max_length=64)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                (
                    "last_used_at",
                    fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
                ),
                ("revoked_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={"table": "api_token", "app": "fleet", "pk_attr": "id"},
            bases=["Model"],
        ),
        ops.CreateModel(
            name="Device",
            fields=[
                (
                    "id",
                    fields.CharField(primary_key=True, unique=True, db_index=True, max_length=40),
                ),
                ("public_key", fields.CharField(unique=True, max_length=64)),
                ("state", fields.CharField(default="enrolled", max_length=16)),
                (
                    "labels",
                    fields.JSONField(
                        default=dict,
                        encoder=functools.partial(dumps, separators=(",", ":")),
                        decoder=loads,
                    ),
                ),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                (
                    "last_seen_at",
                    fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
                ),
            ],
            options={"table": "device", "app": "fleet", "pk_attr": "id"},
            bases=["Model"],
        ),
        ops.CreateModel(
            name="KeyRotation",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("role", fields.CharField(max_length=16)),
                ("root_version", fields.IntField()),
                ("draft", fields.BinaryField()),
                ("new_key_file", fields.CharField(null=True, max_length=255)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                (
                    "completed_at",
                    fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
                ),
            ],
            options={
                "table": "key_rotation",
                "app": "fleet",
                "pk_attr": "id",
                "table_description": "A root change prepared by the controller and waiting for the offline root signatures.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="Rune",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("org", fields.CharField(max_length=64)),
                ("name", fields.CharField(max_length=64)),
                ("version", fields.CharField(max_length=64)),
                ("kind", fields.CharField(max_length=16)),
                ("sha256", fields.CharField(db_index=True, max_length=64)),
                ("size", fields.BigIntField()),
                (
                    "capabilities",
                    fields.JSONField(
                        encoder=functools.partial(dumps, separators=(",", ":")), decoder=loads
                    ),
                ),
                ("min_agent_version", fields.CharField(max_length=32)),
                (
                    "description",
                    fields.JSONField(
                        encoder=functools.partial(dumps, separators=(",", ":")), decoder=loads
                    ),
                ),
                ("target_path", fields.CharField(unique=True, max_length=255)),
                ("pushed_by", fields.CharField(max_length=64)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ("revoked_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ("revoked_by", fields.CharField(null=True, max_length=64)),
            ],
            options={
                "table": "rune",
                "app": "fleet",
                "unique_together": (("org", "name", "version"),),
                "pk_attr": "id",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="TufFile",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("role", fields.CharField(max_length=16)),
                ("version", fields.IntField()),
                ("data", fields.BinaryField()),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={
                "table": "tuf_file",
                "app": "fleet",
                "unique_together": (("role", "version"),),
                "pk_attr": "id",
            },
            bases=["Model"],
        ),
    ]
