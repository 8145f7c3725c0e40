"""Errors a user can cause or fix in data preparation; one line, naming the value."""


class PipelineError(ValueError):
    """Bad input path, bad option or unreadable dataset: the message names it."""


class ChecksumError(PipelineError):
    """A shard's bytes do not match the sha256 its manifest recorded."""
