"""pipeline.io.paths: what a location string means, and which path parts stay under their prefix."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.io.paths import Location, LocationError, absolute_location, is_relative_path, parse_location


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket", Location("bucket", "")),
        ("S3://bucket/a/b/", Location("bucket", "a/b")),
        ("s3://my.bucket-1/datasets/v1", Location("my.bucket-1", "datasets/v1")),
        ("runs/checkpoints", Location(None, "runs/checkpoints")),
        ("/data/runs", Location(None, "/data/runs")),
        ("./a:b", Location(None, "./a:b")),  # a colon inside a local name is no scheme
        ("file:///data/a%20b", Location(None, "/data/a b")),
        ("FILE://localhost/data", Location(None, "/data")),
    ],
)
def test_locations(uri: str, expected: Location) -> None:
    assert parse_location(uri) == expected


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("", "is empty"),
        ("  ", "is empty"),
        ("s3://", "has no bucket"),
        ("s3:///key", "has no bucket"),
        ("s3:bucket/key", "is not a URI (s3: needs //)"),
        ("s3:/bucket/key", "is not a URI (s3: needs //)"),
        ("file:/data", "is not a URI (file: needs //)"),
        ("gs://bucket/x", "has an unsupported scheme 'gs'"),
        ("hdfs://namenode:8020/x", "has an unsupported scheme 'hdfs'"),
        ("s4://bucket", "has an unsupported scheme 's4'"),
        ("runs/s3://bucket", "holds '://' but is not a URI"),
        ("file://host/data", "names host 'host'"),
        ("file://relative/path", "names host 'relative'"),
        ("file://", "has no path"),
        ("s3://127.0.0.1:8333/bucket", "has a port in the bucket's place"),
        ("s3://bucket/key?versionId=1", "has a query or fragment"),
        ("s3://bucket/key#part", "has a query or fragment"),
    ],
)
def test_what_is_not_a_location_is_refused_with_the_key(uri: str, reason: str) -> None:
    with pytest.raises(LocationError, match=re.escape(f"run.storage={uri!r} {reason}")):
        parse_location(uri, "run.storage")


def test_credentials_are_refused_and_not_shown() -> None:
    with pytest.raises(LocationError, match=re.escape("'s3://***@bucket/x' holds credentials")) as error:
        parse_location("s3://AKIDEXAMPLE:s3cr3tvalue@bucket/x")
    assert "s3cr3tvalue" not in str(error.value)


def test_absolute_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_location("s3://bucket/x") == "s3://bucket/x"
    assert absolute_location("runs/x") == str(tmp_path / "runs/x")
    assert absolute_location((tmp_path / "a b").as_uri()) == str(tmp_path / "a b")
    assert is_relative_path("runs/x") and not is_relative_path("/runs/x")
    assert not is_relative_path("s3://bucket/x") and not is_relative_path("file:///x")
