import functools
from json import dumps, loads

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("fleet", "0003_rollouts")]

    initial = False

    operations = [
        ops.CreateModel(
            name="AttestationNonce",
            fields=[
                (
                    "nonce",
                    fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64),
                ),
                ("device_id", fields.CharField(db_index=True, max_length=40)),
                (
                    "expires_at",
                    fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False),
                ),
                ("used_at", fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={
                "table": "attestation_nonce",
                "app": "fleet",
                "pk_attr": "nonce",
                "table_description": "A challenge issued to one device: answered at most once, before `expires_at`.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="AttestationReference",
            fields=[
                (
                    "id",
                    fields.IntField(generated=True, primary_key=True, unique=True, db_index=True),
                ),
                ("kind", fields.CharField(max_length=16)),
                ("name", fields.CharField(max_length=128)),
                ("value", fields.CharField(max_length=255)),
                ("source", fields.CharField(max_length=255)),
                ("created_by", fields.CharField(max_length=64)),
                ("created_at", fields.DatetimeField(auto_now=False, auto_now_add=True)),
            ],
            options={
                "table": "attestation_reference",
                "app": "fleet",
                "unique_together": (("kind", "name", "value"),),
                "pk_attr": "id",
                "table_description": "A reference value: an agent release's code digest (`agent`: `name` is the agent version,",
            },
            bases=["Model"],
        ),
        ops.AddField(
            model_name="Device",
            name="attestation_expires_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name="Device",
            name="attestation_reasons",
            field=fields.JSONField(
                null=True, encoder=functools.partial(dumps, separators=(",", ":")), decoder=loads
            ),
        ),
        ops.AddField(
            model_name="Device",
            name="attestation_status",
            field=fields.CharField(null=True, max_length=16),
        ),
        ops.AddField(
            model_name="Device",
            name="attested_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name="Device",
            name="quarantine_reason",
            field=fields.TextField(null=True, unique=False),
        ),
        ops.AddField(
            model_name="Device",
            name="quarantined_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
    ]
