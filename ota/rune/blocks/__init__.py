"""Processing blocks: the block ABI (fleet-block/1) and the built-in blocks written in WAT."""
