"""The errors of object storage (raised by :mod:`pipeline.io.storage` and its helpers)."""


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the (redacted) location and the cause."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object was created or changed since the version the writer named."""
