"""One exception base for every user error.

The CLI prints an ``NfnetHubError`` as one line (``nfnet-hub <command>: error: ...``) and exits 2;
anything else is a bug and keeps its traceback. Each subclass also derives from the built-in type
that fits, so library callers may catch ``ValueError`` or ``FileExistsError`` as before.
"""
from __future__ import annotations

__all__ = ["BundleError", "CheckpointError", "ExportError", "FoldError", "HubError", "NfnetHubError", "TrainingError",
           "UsageError"]


class NfnetHubError(Exception):
    """A mistake in what the user asked for or gave us; the message says what to do."""


class UsageError(NfnetHubError, ValueError):
    """An option or argument that cannot work (a bad value, a conflict, a missing input)."""


class CheckpointError(NfnetHubError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class FoldError(NfnetHubError, TypeError):
    """The model holds a module that fold does not know how to make plain."""


class ExportError(NfnetHubError, RuntimeError):
    """An export that failed a check; nothing was written."""


class BundleError(NfnetHubError, ValueError):
    """A bundle that is incomplete, altered or fails its parity record, or a folder that is not a bundle."""


class HubError(NfnetHubError, RuntimeError):
    """The Hugging Face Hub could not be reached, or refused a request."""


class TrainingError(NfnetHubError, RuntimeError):
    """A training run that cannot start, or cannot go on (the last good checkpoint is kept)."""
