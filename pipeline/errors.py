"""Errors a user can cause or fix in data preparation; one line, naming the value."""


class PipelineError(ValueError):
    """Bad input path, bad option or unreadable dataset: the message names it."""


class InputNotFoundError(PipelineError):
    """An input URI names nothing: no file, no folder, no glob match."""


class ManifestError(PipelineError):
    """No committed dataset at a URI, or its manifest is not one this code can read."""


class ChecksumError(PipelineError):
    """A shard's bytes do not match the sha256 its manifest recorded."""


class StorageError(PipelineError):
    """A write to storage did not land as written (size or listing mismatch)."""


class UnsafePathError(PipelineError):
    """A path in a manifest leaves the dataset's own folder (absolute, ``..``, another bucket)."""
