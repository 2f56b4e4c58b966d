"""Errors that name what went wrong and where (file, line, utterance, layer)."""


class QuasrError(Exception):
    """Base class: a problem the user can fix, reported without a traceback by the CLI."""


class DataError(QuasrError, ValueError):
    """Bad input data: unreadable or empty audio, missing text, a malformed manifest line."""


class ModelError(QuasrError, ValueError):
    """A model spec that cannot be resolved, or weights that cannot be converted."""


class UsageError(QuasrError, ValueError):
    """A command-line option value that cannot work (a non-positive batch size, ...)."""
