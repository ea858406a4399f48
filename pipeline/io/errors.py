"""The errors of object storage (raised by :mod:`pipeline.io.storage` and its helpers), and the one line a
user reads of any error."""

from pipeline.io.redaction import redact


class StorageError(RuntimeError):
    """A storage operation failed; the message is one line naming the (redacted) location and the cause."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object was created or changed since the version the writer named."""


def user_message(error: BaseException) -> str:
    """The error as the user reads it, redacted. An error raised in a DataLoader worker arrives wrapped in
    "Caught X in DataLoader worker process N" and the worker's traceback, whose last line is the error."""
    text = str(error).strip() or type(error).__name__
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return redact(text)
