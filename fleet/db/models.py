"""The controller's tables. Changing a field means a new migration in `fleet.db.migrations`.

Rules:
- API tokens are stored as SHA-256 hashes only; the token itself is shown once when it is made.
- A rune version (org, name, version) is unique and its bytes are immutable: `sha256` names the
  content-addressed blob. Revoking sets `revoked_at`; the row stays for the record.
- TUF metadata files are stored by (role, version), every version kept, so a consistent-snapshot
  client can fetch the exact version the timestamp names.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class ApiToken(Model):
    id = fields.IntField(primary_key=True)
    name = fields.CharField(max_length=64)
    role = fields.CharField(max_length=16)
    token_hash = fields.CharField(max_length=64, unique=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    last_used_at = fields.DatetimeField(null=True)
    revoked_at = fields.DatetimeField(null=True)

    class Meta:
        table = "api_token"


class Rune(Model):
    id = fields.IntField(primary_key=True)
    org = fields.CharField(max_length=64)
    name = fields.CharField(max_length=64)
    version = fields.CharField(max_length=64)
    kind = fields.CharField(max_length=16)
    sha256 = fields.CharField(max_length=64, db_index=True)
    size = fields.BigIntField()
    capabilities = fields.JSONField[list[str]]()
    min_agent_version = fields.CharField(max_length=32)
    description = fields.JSONField[dict[str, object]]()
    target_path = fields.CharField(max_length=255, unique=True)
    pushed_by = fields.CharField(max_length=64)
    created_at = fields.DatetimeField(auto_now_add=True)
    revoked_at = fields.DatetimeField(null=True)
    revoked_by = fields.CharField(max_length=64, null=True)

    class Meta:
        table = "rune"
        unique_together = (("org", "name", "version"),)


class TufFile(Model):
    id = fields.IntField(primary_key=True)
    role = fields.CharField(max_length=16)
    version = fields.IntField()
    data = fields.BinaryField()
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "tuf_file"
        unique_together = (("role", "version"),)


class Device(Model):
    id = fields.CharField(primary_key=True, max_length=40)
    public_key = fields.CharField(max_length=64, unique=True)
    state = fields.CharField(max_length=16, default="enrolled")
    labels = fields.JSONField[dict[str, str]](default=dict)
    created_at = fields.DatetimeField(auto_now_add=True)
    last_seen_at = fields.DatetimeField(null=True)

    class Meta:
        table = "device"


class KeyRotation(Model):
    """A root change prepared by the controller and waiting for the offline root signatures."""

    id = fields.IntField(primary_key=True)
    role = fields.CharField(max_length=16)
    root_version = fields.IntField()
    draft = fields.BinaryField()
    new_key_file = fields.CharField(max_length=255, null=True)
    created_at = fields.DatetimeField(auto_now_add=True)
    completed_at = fields.DatetimeField(null=True)

    class Meta:
        table = "key_rotation"
