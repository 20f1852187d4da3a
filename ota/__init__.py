"""Everything that crosses the air: the wire protocol, the rune format and signed updates.

May use `attestation`; never imports `agent` or `fleet`.
"""
