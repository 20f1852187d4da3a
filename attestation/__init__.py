"""Identities, keys, DSSE envelopes, evidence, verifier, policies and provenance.

Depends on nothing else of Fleet's: `ota`, `agent` and `fleet` build on it.
"""
