"""What can go wrong when running a rune, as errors a person can act on.

Every error raised out of the sandbox is a `SandboxError`: it names what the rune did (or what is
wrong with it) and what to change. A wasm trap, a limit, a bad pointer or a malformed module is
never a traceback and never takes the host process down.
"""

from __future__ import annotations


class SandboxError(Exception):
    """A rune could not be loaded or run; the message says why."""


class ModuleRejected(SandboxError):
    """Refused at load: malformed wasm, forbidden imports, missing exports or metadata."""


class LimitExceeded(SandboxError):
    """The rune went past a limit: fuel, wall clock, memory, output, model or resource size."""


class CapabilityDenied(SandboxError):
    """The rune asked for a capability its manifest does not declare or the policy forbids."""


class GuestFault(SandboxError):
    """The rune trapped, or handed the host a pointer, length or value that is not valid."""


class ModelError(SandboxError):
    """A model could not be loaded or run (including a runtime that is not installed)."""


class InputError(SandboxError):
    """An input source (image, WAV, CSV, raw file) is missing or unreadable for this rune."""


class RuneReportedError(SandboxError):
    """The rune (or one of its blocks) ran and reported an error of its own."""
