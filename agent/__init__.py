"""The device side: the WebAssembly sandbox, the `rune` CLI and the `fleet-agent` daemon.

Uses `attestation` and `ota`; never imports `fleet` (a device installs without the controller's
server stack).
"""
