from tortoise import fields, migrations
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("fleet", "0006_telemetry")]

    initial = False

    operations = [
        ops.CreateModel(
            name="AuditRecord",
            fields=[
                (
                    "seq",
                    fields.BigIntField(
                        generated=False, primary_key=True, unique=True, db_index=True
                    ),
                ),
                ("at", fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False)),
                ("actor", fields.CharField(max_length=300)),
                ("action", fields.CharField(db_index=True, max_length=300)),
                ("target", fields.CharField(max_length=300)),
                ("outcome", fields.CharField(max_length=300)),
                ("details", fields.TextField(unique=False)),
                ("prev", fields.CharField(max_length=64)),
                ("hash", fields.CharField(max_length=64)),
            ],
            options={
                "table": "audit_record",
                "app": "fleet",
                "pk_attr": "seq",
                "table_description": "One entry of the audit log's hash chain (`fleet.audit`).",
            },
            bases=["Model"],
        ),
    ]
