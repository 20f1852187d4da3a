"""The controller's tables. Changing a field means a new migration in `fleet.db.migrations`.

Rules:
- API tokens are stored as SHA-256 hashes only; the token itself is shown once when it is made.
- A rune version (org, name, version) is unique and its bytes are immutable: `sha256` names the
  content-addressed blob. Revoking sets `revoked_at`; the row stays for the record.
- TUF metadata files are stored by (role, version), every version kept, so a consistent-snapshot
  client can fetch the exact version the timestamp names.
- A device's id is derived from its public key (`attestation.identity`); its `state` is `pending`
  (enrolled without a token, waiting for an operator), `enrolled` (the default, also for devices
  registered by key) or `rejected`. Only `enrolled` devices may fetch updates or get commands.
- Enrollment tokens, like API tokens, are stored as SHA-256 hashes only; `used` never exceeds
  `uses`. An enrollment request's signed message is remembered (by digest) in
  `enrollment_signature` until it is past the clock-skew window, so it cannot be replayed.
- Commands name their device by id (a plain string, not a foreign key), so removing a device keeps
  its command history.
- An attestation nonce is stored when it is issued and marked used when evidence answers it, so a
  nonce answers once, across restarts and replicas.
- A telemetry report is stored once per (device, seq); its streams' noisy aggregates are rows of
  `telemetry_value`. Nothing in either is a raw sample or output (`ota.telemetry`).
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
    # The provenance it was admitted with: `dsse` (an in-toto statement signed by a publisher
    # key, `provenance_keyid`), `sigstore` (a bundle for an accepted identity), or none.
    provenance = fields.CharField(max_length=16, null=True)
    provenance_sha256 = fields.CharField(max_length=64, null=True)
    provenance_signer = fields.CharField(max_length=255, null=True)

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
    # Columns added after devices existed have a database default too (`db_default`), so the
    # migration can add them to existing rows.
    # What the agent reported about itself at enrollment (agent version, platform, boot id...).
    facts = fields.JSONField[dict[str, object]](default=dict, db_default={})
    agent_version = fields.CharField(max_length=32, null=True)
    active_rune = fields.CharField(max_length=255, null=True)
    active_sha256 = fields.CharField(max_length=64, null=True)
    previous_rune = fields.CharField(max_length=255, null=True)
    online = fields.BooleanField(default=False, db_default=False)
    enrolled_at = fields.DatetimeField(null=True)
    # The enrollment token that admitted it, if any (for the record; tokens are never deleted).
    enrollment_token_id = fields.IntField(null=True)
    # The last CSR the device sent (PEM), so approving a pending device can issue its certificate.
    csr = fields.TextField(null=True)
    # Its current certificate from the fleet CA (PEM), serial (hex) and expiry.
    cert = fields.TextField(null=True)
    cert_serial = fields.CharField(max_length=40, null=True)
    cert_not_after = fields.DatetimeField(null=True)
    # The command channel: last seq used controller -> device, last accepted from the device.
    command_seq = fields.BigIntField(default=0, db_default=0)
    status_seq = fields.BigIntField(default=0, db_default=0)
    presence_seq = fields.BigIntField(default=0, db_default=0)
    last_hello = fields.JSONField[dict[str, object]](null=True)
    # The last attestation result (`fleet.attestation`): its status, reasons, and when it was
    # issued and stops being fresh. A device is quarantined from `quarantined_at` on.
    attestation_status = fields.CharField(max_length=16, null=True)
    attestation_reasons = fields.JSONField[list[str]](null=True)
    attested_at = fields.DatetimeField(null=True)
    attestation_expires_at = fields.DatetimeField(null=True)
    quarantined_at = fields.DatetimeField(null=True)
    quarantine_reason = fields.TextField(null=True)
    # Telemetry reports at or below this seq were deleted by retention (`fleet.telemetry`): a
    # copy of one arriving again is a replay, not a new report.
    telemetry_floor = fields.BigIntField(default=0, db_default=0)

    class Meta:
        table = "device"


class EnrollmentToken(Model):
    """A pre-authorized enrollment: up to `uses` devices, until `expires_at`, with `labels`."""

    id = fields.IntField(primary_key=True)
    token_hash = fields.CharField(max_length=64, unique=True)
    uses = fields.IntField()
    used = fields.IntField(default=0)
    labels = fields.JSONField[dict[str, str]](default=dict)
    expires_at = fields.DatetimeField()
    created_by = fields.CharField(max_length=64)
    created_at = fields.DatetimeField(auto_now_add=True)
    last_used_at = fields.DatetimeField(null=True)
    revoked_at = fields.DatetimeField(null=True)

    class Meta:
        table = "enrollment_token"


class EnrollmentSignature(Model):
    """An enrollment request already seen: the SHA-256 of its signed message, until it expires."""

    # Kept until `expires_at`, when its Fleet-Date is outside the clock-skew window anyway.

    digest = fields.CharField(primary_key=True, max_length=64)
    device_id = fields.CharField(max_length=40)
    expires_at = fields.DatetimeField(db_index=True)

    class Meta:
        table = "enrollment_signature"


class Command(Model):
    """A command in the outbox: stored before it is published, re-sent until acknowledged."""

    # A uuid4 hex, or `{rollout id}.{device id}.{attempt}` for a rollout's deploys.
    id = fields.CharField(primary_key=True, max_length=64)
    device_id = fields.CharField(max_length=40, db_index=True)
    type = fields.CharField(max_length=16)
    body = fields.JSONField[dict[str, object]]()
    state = fields.CharField(max_length=16, default="queued", db_index=True)
    reason = fields.TextField(default="")
    created_by = fields.CharField(max_length=64)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)
    sent_at = fields.DatetimeField(null=True)
    attempts = fields.IntField(default=0)
    last_seq = fields.BigIntField(default=0)
    deadline = fields.DatetimeField()
    finished_at = fields.DatetimeField(null=True)

    class Meta:
        table = "command"


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


class Rollout(Model):
    """A rollout of one rune version to a selector, in waves.

    `machine` is the state machine's `to_dict()`; `state`, `reason`, `started_at` and
    `finished_at` mirror it for queries.

    Every write of `machine` checks and bumps `version`, so two writers (the scheduler and an
    operator action) never overwrite each other's changes.
    """

    id = fields.CharField(primary_key=True, max_length=16)
    org = fields.CharField(max_length=64)
    rune_name = fields.CharField(max_length=64)
    rune_version = fields.CharField(max_length=64)
    rune_target = fields.CharField(max_length=255)
    selector = fields.JSONField[dict[str, str]](default=dict)
    devices = fields.JSONField[list[str]](null=True)
    options = fields.JSONField[dict[str, object]]()
    selected = fields.IntField(default=0)
    state = fields.CharField(max_length=16, db_index=True)
    reason = fields.TextField(null=True)
    machine = fields.JSONField[dict[str, object]]()
    version = fields.IntField(default=0)
    created_by = fields.CharField(max_length=64)
    created_at = fields.DatetimeField(auto_now_add=True)
    updated_at = fields.DatetimeField(auto_now=True)
    started_at = fields.DatetimeField(null=True)
    finished_at = fields.DatetimeField(null=True)

    class Meta:
        table = "rollout"


class RolloutDevice(Model):
    """A device a rollout selected (at creation) or drew (when a wave started).

    It is what finds a device's unfinished rollout (the overlap refusal), and it records what the
    device ran before the rollout first notified it (`previous_rune`, for a rollback).
    """

    id = fields.IntField(primary_key=True)
    rollout_id = fields.CharField(max_length=16, db_index=True)
    device_id = fields.CharField(max_length=40, db_index=True)
    wave = fields.IntField(null=True)
    previous_rune = fields.CharField(max_length=255, null=True)
    notified_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "rollout_device"
        unique_together = (("rollout_id", "device_id"),)


class AttestationNonce(Model):
    """A challenge issued to one device: answered at most once, before `expires_at`."""

    nonce = fields.CharField(primary_key=True, max_length=64)
    device_id = fields.CharField(max_length=40, db_index=True)
    expires_at = fields.DatetimeField(db_index=True)
    used_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "attestation_nonce"


class AttestationReference(Model):
    """A reference value: an agent release's code digest (`agent`: `name` is the agent version,
    `value` the manifest SHA-256), or a config constraint (`config`: `name` is the setting's dot
    path, `value` its required value as JSON, one per path)."""

    id = fields.IntField(primary_key=True)
    kind = fields.CharField(max_length=16)
    name = fields.CharField(max_length=128)
    value = fields.CharField(max_length=255)
    source = fields.CharField(max_length=255)
    created_by = fields.CharField(max_length=64)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "attestation_reference"
        unique_together = (("kind", "name", "value"),)


class AdmissionPolicy(Model):
    """What provenance an org's runes need to be admitted (`fleet.provenance`).

    `publisher_keys` holds `{"keyid", "key", "name"}` entries (the public key as securesystemslib
    serializes it), `revoked_keys` key ids, `sigstore_identities` `{"identity", "issuer"}`
    entries, and `trusted_root` is `production`, `staging` or a trusted root's JSON.
    """

    org = fields.CharField(primary_key=True, max_length=64)
    require_provenance = fields.BooleanField(default=False)
    publisher_keys = fields.JSONField[list[dict[str, object]]](default=list)
    revoked_keys = fields.JSONField[list[str]](default=list)
    sigstore_identities = fields.JSONField[list[dict[str, str]]](default=list)
    trusted_root = fields.TextField(default="production")
    updated_by = fields.CharField(max_length=64)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "admission_policy"


class TelemetryReport(Model):
    """One device's report for one window (`ota.telemetry`): operational state and what paused."""

    id = fields.BigIntField(primary_key=True)
    device_id = fields.CharField(max_length=40)
    seq = fields.BigIntField()
    window_start = fields.DatetimeField()
    window_end = fields.DatetimeField(db_index=True)
    received_at = fields.DatetimeField()
    active_rune = fields.CharField(max_length=255, null=True)
    ops = fields.JSONField[dict[str, object]]()
    paused = fields.JSONField[list[object]](default=list)

    class Meta:
        table = "telemetry_report"
        unique_together = (("device_id", "seq"),)


class TelemetryValue(Model):
    """One stream's noisy aggregate in one report: a vector over the stream's keys."""

    id = fields.BigIntField(primary_key=True)
    report_id = fields.BigIntField(db_index=True)
    device_id = fields.CharField(max_length=40, db_index=True)
    stream = fields.CharField(max_length=100, db_index=True)
    rune = fields.CharField(max_length=255)
    kind = fields.CharField(max_length=16)
    keys = fields.JSONField[list[str]]()
    vector = fields.JSONField[list[float]]()  # one noisy value per key
    mechanism = fields.CharField(max_length=16)
    epsilon = fields.FloatField()
    delta = fields.FloatField()
    noise_std = fields.FloatField()
    window_end = fields.DatetimeField(db_index=True)

    class Meta:
        table = "telemetry_value"
