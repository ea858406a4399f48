"""What a location string means, decided in one place, and the rule for a path part joined under a prefix.

A location is ``s3://bucket[/prefix]``, a plain local path, or ``file:///absolute/path`` (the same local
path). Anything else that looks like a URI (``gs://``, ``hdfs://``, ``s3://`` without a bucket, ``s3:bucket``)
is refused with the reason, never taken as a local folder of that name. Storage parses every location here;
config validation and the command line ask here too, so a bad one is refused before anything is written.
This module is light (no boto3, pyarrow or torch): config and the CLI import it.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from pipeline.io.redaction import has_userinfo, redact

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HINT = "use s3://bucket[/prefix], a local path or file:///absolute/path"


class LocationError(ValueError):
    """A string that is not a location; the message names it (redacted) and says why."""


@dataclass(frozen=True)
class Location:
    """A parsed location.

    Attributes:
        bucket: the S3 bucket, or None for a local path.
        path: the key prefix inside the bucket (no leading or trailing "/", "" for the whole bucket), or the
            local path as written (a ``file://`` URI's path, percent-decoded).
    """

    bucket: str | None
    path: str

    @property
    def is_s3(self) -> bool:
        return self.bucket is not None


def parse_location(uri: str, name: str | None = None) -> Location:
    """Parses ``uri``; raises LocationError naming ``name`` (e.g. "run.storage") and the value when it is
    not a location.

    Refused: an empty string; ``s3://`` without a bucket, with credentials or a port in the bucket's place,
    or with a query or fragment; a ``file://`` URI naming another host; ``s3:`` or ``file:`` without ``//``;
    any other scheme; ``://`` inside a local path.
    """
    shown = f"{name}={redact(uri)!r}" if name else repr(redact(uri))

    def refuse(reason: str) -> LocationError:
        return LocationError(f"{shown} {reason}")

    if not uri.strip():
        raise refuse(f"is empty; {_HINT}")
    match = _SCHEME.match(uri)
    scheme = match.group(1).lower() if match else None
    if scheme in ("s3", "file") and not uri[len(scheme) + 1 :].startswith("//"):
        raise refuse(f"is not a URI ({scheme}: needs //); {_HINT}")
    if scheme not in ("s3", "file"):
        if "://" in uri:
            what = f"has an unsupported scheme {scheme!r}" if match else "holds '://' but is not a URI"
            raise refuse(f"{what}; {_HINT}")
        return Location(None, uri)
    if has_userinfo(uri):  # before any split: a secret may hold "/", ":", "?" or "@"
        raise refuse("holds credentials: keys belong in the environment (AWS_ACCESS_KEY_ID, ...)")
    parsed = urllib.parse.urlsplit(uri)
    if parsed.query or parsed.fragment or uri.endswith(("?", "#")):
        raise refuse("has a query or fragment ('?' or '#')")
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise refuse(f"names host {parsed.netloc!r}: write file:///absolute/path, or a plain path")
        if not parsed.path:
            raise refuse("has no path: write file:///absolute/path, or a plain path")
        return Location(None, urllib.parse.unquote(parsed.path))
    if not parsed.netloc:
        raise refuse("has no bucket: write s3://bucket[/prefix]")
    if ":" in parsed.netloc:
        raise refuse("has a port in the bucket's place: the endpoint belongs in AWS_ENDPOINT_URL")
    return Location(parsed.netloc, parsed.path.strip("/"))


def absolute_location(uri: str, name: str | None = None) -> str:
    """``uri`` unchanged for S3; a local location (plain or ``file://``) as an absolute plain path, symlinks
    resolved. Raises LocationError as :func:`parse_location` does."""
    location = parse_location(uri, name)
    return uri if location.is_s3 else str(Path(location.path).resolve())


def is_relative_path(uri: str) -> bool:
    """True for a local path that is not absolute (it depends on the working directory)."""
    location = parse_location(uri)
    return not location.is_s3 and not os.path.isabs(location.path)


def stays_inside(part: str) -> bool:
    """False for an empty or absolute part, a URI, or one with a ``..`` component (either slash).

    The rule for a path part joined under a prefix (a run name under ``run.storage``, a shard under its
    dataset version): it must stay inside.
    """
    pieces = re.split(r"[/\\]", part)
    absolute = not pieces[0] or os.path.isabs(part)
    return bool(part) and not absolute and "://" not in part and ".." not in pieces


def normal_location(uri: str) -> str:
    """``uri`` in one spelling: S3 without a trailing "/", a local path absolute with links resolved."""
    location = parse_location(uri)
    if location.is_s3:
        return uri.rstrip("/")
    return os.path.realpath(location.path)


def inside(uri: str, folder: str) -> bool:
    """Whether ``uri`` is ``folder`` or lies below it (see :func:`normal_location`)."""
    path, root = normal_location(uri), normal_location(folder)
    return path == root or path.startswith(root.rstrip("/") + "/")


def overlap(a: str, b: str) -> bool:
    """Whether one of two locations lies inside the other (or they are the same)."""
    return inside(a, b) or inside(b, a)
