import functools
from json import dumps, loads

from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("fleet", "0004_attestation")]

    initial = False

    operations = [
        ops.CreateModel(
            name="AdmissionPolicy",
            fields=[
                (
                    "org",
                    fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64),
                ),
                ("require_provenance", fields.BooleanField(default=False)),
                (
                    "publisher_keys",
                    fields.JSONField(
                        default=list,
                        encoder=functools.partial(dumps, separators=(",", ":")),
                        decoder=loads,
                    ),
                ),
                (
                    "revoked_keys",
                    fields.JSONField(
                        default=list,
                        encoder=functools.partial(dumps, separators=(",", ":")),
                        decoder=loads,
                    ),
                ),
                (
                    "sigstore_identities",
                    fields.JSONField(
                        default=list,
                        encoder=functools.partial(dumps, separators=(",", ":")),
                        decoder=loads,
                    ),
                ),
                ("trusted_root", fields.TextField(default="production", unique=False)),
                ("updated_by", fields.CharField(max_length=64)),
                ("updated_at", fields.DatetimeField(auto_now=True, auto_now_add=False)),
            ],
            options={
                "table": "admission_policy",
                "app": "fleet",
                "pk_attr": "org",
                "table_description": "What provenance an org's runes need to be admitted (`fleet.provenance`).",
            },
            bases=["Model"],
        ),
        ops.AddField(
            model_name="Rune",
            name="provenance",
            field=fields.CharField(null=True, max_length=16),
        ),
        ops.AddField(
            model_name="Rune",
            name="provenance_sha256",
            field=fields.CharField(null=True, max_length=64),
        ),
        ops.AddField(
            model_name="Rune",
            name="provenance_signer",
            field=fields.CharField(null=True, max_length=255),
        ),
    ]
