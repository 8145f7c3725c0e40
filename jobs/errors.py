"""Errors a user can cause or fix; the CLI prints them as one line, no traceback."""


class JobError(RuntimeError):
    """A run cannot go on for a reason the user can act on (resume mismatch, no checkpoint...)."""
