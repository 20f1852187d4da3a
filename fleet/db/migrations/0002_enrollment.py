import functools
from json import dumps, loads

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("fleet", "0001_initial")]

    initial = False

    operations = [
        ops.CreateModel(
            name="Command",
            fields=[
                (
                    "id",
                    fields.CharField(primary_key=True, unique=True, db_index=True, max_length=36),
                ),
                ("device_id", fields.CharField(db_index=True, max_length=40)),
                ("type", fields.CharField(max_length=16)),
                (
                    "body",
                    fields.JSONField(
                        encoder=functools.partial(dumps, separators=(",", ":")), decoder=loads
                    ),
                ),
                ("state", fields.CharField(default="queued", db_index=True, max_length=16)),
                ("reason", fields.TextField(default="", unique=False)),
                ("created_by", fields.CharField(max_length=64)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                ("updated_at", fields.DatetimeField(auto_now=True, auto_now_add=False)),
                ("sent_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ("attempts", fields.IntField(default=0)),
                ("last_seq", fields.BigIntField(default=0)),
                ("deadline", fields.DatetimeField(auto_now=False, auto_now_add=False)),
                (
                    "finished_at",
                    fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
                ),
            ],
            options={
                "table": "command",
                "app": "fleet",
                "pk_attr": "id",
                "table_description": "A command in the outbox: stored before it is published, re-sent until acknowledged.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="EnrollmentSignature",
            fields=[
                (
                    "digest",
                    fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64),
                ),
                ("device_id", fields.CharField(max_length=40)),
                (
                    "expires_at",
                    fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False),
                ),
            ],
            options={
                "table": "enrollment_signature",
                "app": "fleet",
                "pk_attr": "digest",
                "table_description": "An enrollment request already seen: the SHA-256 of its signed message, until it expires.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="EnrollmentToken",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("token_hash", fields.CharField(unique=True, max_length=64)),
                ("uses", fields.IntField()),
                ("used", fields.IntField(default=0)),
                (
                    "labels",
                    fields.JSONField(
                        default=dict,
                        encoder=functools.partial(dumps, separators=(",", ":")),
                        decoder=loads,
                    ),
                ),
                ("expires_at", fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ("created_by", fields.CharField(max_length=64)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
                (
                    "last_used_at",
                    fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
                ),
                ("revoked_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={
                "table": "enrollment_token",
                "app": "fleet",
                "pk_attr": "id",
                "table_description": "A pre-authorized enrollment: up to `uses` devices, until `expires_at`, with `labels`.",
            },
            bases=["Model"],
        ),
        ops.AddField(
            model_name="Device",
            name="active_rune",
            field=fields.CharField(null=True, max_length=255),
        ),
        ops.AddField(
            model_name="Device",
            name="active_sha256",
            field=fields.CharField(null=True, max_length=64),
        ),
        ops.AddField(
            model_name="Device",
            name="agent_version",
            field=fields.CharField(null=True, max_length=32),
        ),
        ops.AddField(
            model_name="Device",
            name="cert",
            field=fields.TextField(null=True, unique=False),
        ),
        ops.AddField(
            model_name="Device",
            name="cert_not_after",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name="Device",
            name="cert_serial",
            field=fields.CharField(null=True, max_length=40),
        ),
        ops.AddField(
            model_name="Device",
            name="command_seq",
            field=fields.BigIntField(default=0, db_default=0),
        ),
        ops.AddField(
            model_name="Device",
            name="csr",
            field=fields.TextField(null=True, unique=False),
        ),
        ops.AddField(
            model_name="Device",
            name="enrolled_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name="Device",
            name="enrollment_token_id",
            field=fields.IntField(null=True),
        ),
        ops.AddField(
            model_name="Device",
            name="facts",
            field=fields.JSONField(
                default=dict,
                db_default={},
                encoder=functools.partial(dumps, separators=(",", ":")),
                decoder=loads,
            ),
        ),
        ops.AddField(
            model_name="Device",
            name="last_hello",
            field=fields.JSONField(
                null=True, encoder=functools.partial(dumps, separators=(",", ":")), decoder=loads
            ),
        ),
        ops.AddField(
            model_name="Device",
            name="online",
            field=fields.BooleanField(default=False, db_default=False),
        ),
        ops.AddField(
            model_name="Device",
            name="presence_seq",
            field=fields.BigIntField(default=0, db_default=0),
        ),
        ops.AddField(
            model_name="Device",
            name="previous_rune",
            field=fields.CharField(null=True, max_length=255),
        ),
        ops.AddField(
            model_name="Device",
            name="status_seq",
            field=fields.BigIntField(default=0, db_default=0),
        ),
    ]
