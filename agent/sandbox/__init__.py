"""Runs untrusted runes: legacy `.rune` modules and bundles, inside wasmtime with hard limits."""
