"""The ``ccnet`` command line, in process and as the installed console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import main


def test_models_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "ccnet_r101_deepstem_d8" in names and "nonlocal_tiny" in names


def test_efficiency_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "efficiency",
                "--feature-size",
                "9",
                "--channels",
                "32",
                "--repeats",
                "1",
                "--model",
                "ccnet_tiny",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in ("non-local", "criss-cross R=1", "criss-cross R=2", "criss-cross R=3", "rows-then-columns"):
        assert f"\n{row} " in out
    assert "ccnet_tiny (19 classes) at 65x65" in out


def test_bad_value_is_one_line_and_nonzero() -> None:
    command = [sys.executable, "-m", "pipeline.cli", "efficiency", "--feature-size", "9", "--channels", "4"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "ERROR ccnet efficiency: argument --channels: must be a finite number >= 8, got '4' "
        "(see ccnet efficiency --help)"
    ]


CONSOLE_SCRIPT = Path(sys.executable).parent / "ccnet"


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="console script not installed (pip install -e .)")
def test_console_script() -> None:
    result = subprocess.run([str(CONSOLE_SCRIPT), "models"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "ccnet_tiny" in result.stdout


def test_data_prepare_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "datasets")
    args = [
        "data",
        "prepare",
        "--dataset",
        "generated",
        "--out",
        out,
        "--count",
        "train=6,val=2",
        "--image-size",
        "64",
        "--workers",
        "1",
    ]
    assert main(args) == 0
    assert f"{out}/generated/v1: train 6, val 2 samples in 2 shards" in capsys.readouterr().out
    assert main(args) == 0  # idempotent
    grid = tmp_path / "grid.png"
    assert main(["data", "inspect", f"{out}/generated/v1", "--grid", str(grid)]) == 0
    report = capsys.readouterr().out
    assert "samples: train 6, val 2" in report and "band-red" in report and grid.stat().st_size > 0
    assert "class pixels, train (6 samples read), median-frequency weight:" in report
    # Each class's line: its share, then its weight; void has none.
    train = report.split("class pixels, train")[1].split("class pixels, val")[0].splitlines()[1:]
    rows = {line.split()[0]: line.split()[1:] for line in train}
    assert rows.pop("(void)")[1:] == [] and len(rows) == 6  # the generated dataset's classes
    assert all(len(cells) == 2 and float(cells[1]) > 0 for cells in rows.values())


def test_data_prepare_bad_root_is_one_line(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "data",
        "prepare",
        "--dataset",
        "camvid",
        "--root",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"ERROR {tmp_path / 'nowhere'}: dataset root is not a folder"
