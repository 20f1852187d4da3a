from orjson import loads
from tortoise import fields, migrations
from tortoise.fields.data import JSON_DUMPS
from tortoise.migrations import operations as ops


class Migration(migrations.Migration):
    dependencies = [("fleet", "0005_provenance")]

    initial = False

    operations = [
        ops.CreateModel(
            name="TelemetryReport",
            fields=[
                (
                    "id",
                    fields.BigIntField(
                        generated=True, primary_key=True, unique=True, db_index=True
                    ),
                ),
                ("device_id", fields.CharField(max_length=40)),
                ("seq", fields.BigIntField()),
                ("window_start", fields.DatetimeField(auto_now=False, auto_now_add=False)),
                (
                    "window_end",
                    fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False),
                ),
                ("received_at", fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ("active_rune", fields.CharField(null=True, max_length=255)),
                ("ops", fields.JSONField(encoder=JSON_DUMPS, decoder=loads)),
                ("paused", fields.JSONField(default=list, encoder=JSON_DUMPS, decoder=loads)),
            ],
            options={
                "table": "telemetry_report",
                "app": "fleet",
                "unique_together": (("device_id", "seq"),),
                "pk_attr": "id",
                "table_description": "One device's report for one window (`ota.telemetry`): operational state and what paused.",
            },
            bases=["Model"],
        ),
        ops.CreateModel(
            name="TelemetryValue",
            fields=[
                (
                    "id",
                    fields.BigIntField(
                        generated=True, primary_key=True, unique=True, db_index=True
                    ),
                ),
                ("report_id", fields.BigIntField(db_index=True)),
                ("device_id", fields.CharField(db_index=True, max_length=40)),
                ("stream", fields.CharField(db_index=True, max_length=100)),
                ("rune", fields.CharField(max_length=255)),
                ("kind", fields.CharField(max_length=16)),
                ("keys", fields.JSONField(encoder=JSON_DUMPS, decoder=loads)),
                ("vector", fields.JSONField(encoder=JSON_DUMPS, decoder=loads)),
                ("mechanism", fields.CharField(max_length=16)),
                ("epsilon", fields.FloatField()),
                ("delta", fields.FloatField()),
                ("noise_std", fields.FloatField()),
                (
                    "window_end",
                    fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False),
                ),
            ],
            options={
                "table": "telemetry_value",
                "app": "fleet",
                "pk_attr": "id",
                "table_description": "One stream's noisy aggregate in one report: a vector over the stream's keys.",
            },
            bases=["Model"],
        ),
        ops.AddField(
            model_name="Device",
            name="telemetry_floor",
            field=fields.BigIntField(default=0, db_default=0),
        ),
    ]
