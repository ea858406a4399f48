"""Searches on a local Ray, recorded as nested MLflow runs, resumable: a 2-trial ASHA search and an ablation
grid of 2 variants x 2 seeds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.train.identity import IdentityError

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def tiny_run(
    generated_dataset: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[str], str]:
    """Overrides for a tiny generated dataset, storage under tmp_path and a sqlite MLflow; and its URI."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    data_uri = generated_dataset(size=48, train=8, val=2)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        f"data.uri={data_uri}",
        "data.batch_size=4",
        f"run.storage={tmp_path / 'runs'}",
        f"tracking.uri={tracking}",
        "run.cpus_per_worker=0.5",
        "train.checkpoint_every=2",
        "train.eval_every=2",
    ]
    return overrides, tracking


def _runs(tracking: str) -> list[tuple[str, str, int | None]]:
    """Every tracked run: id, status, end time."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    ids = [experiment.experiment_id for experiment in client.search_experiments()]
    return sorted((run.info.run_id, run.info.status, run.info.end_time) for run in client.search_runs(ids))


def test_two_trial_search(tiny_run: tuple[list[str], str]) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.train.tune import run_search

    overrides, tracking = tiny_run
    config = load_config(
        None,
        [
            *overrides,
            "train.iterations=4",
            "train.log_every=2",
            "eval.scales=[1.0]",
            "tune.name=tiny-search",
            "tune.num_samples=2",
            "tune.grace_period=2",
            "tune.space={train.lr: {loguniform: [0.001, 0.1]}, data.crop_size: {choice: [32, 48]}}",
        ],
    )
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        report = run_search(config)
        again = run_search(config)  # the same search name: restored, its finished trials not run again
    finally:
        ray.shutdown()
    assert again.parent_run_id == report.parent_run_id
    assert sorted(again.table.splitlines()) == sorted(report.table.splitlines())  # same trials and results
    assert report.table.count("\n") == 3  # header, rule, two trials
    assert set(report.best) == {"train.lr", "data.crop_size"} and 0.0 <= report.best_value <= 1.0

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("ccnet")
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == report.parent_run_id]
    assert len(children) == 2
    for child in children:
        assert client.get_metric_history(child.info.run_id, "train/loss")
        assert "sampled.train.lr" in child.data.params
    artifacts = {a.path for a in client.list_artifacts(report.parent_run_id, "search")}
    assert artifacts == {"search/results.md", "search/best.json", "search/best_config.yaml"}


def test_ablation_grid_of_variants_and_seeds(
    tiny_run: tuple[list[str], str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray
    from mlflow.tracking import MlflowClient

    from pipeline.cli.main import build_parser
    from pipeline.train.report import study_report
    from pipeline.train.tune import run_search

    overrides, tracking = tiny_run
    settings = [
        *overrides,
        "data.crop_size=48",
        "train.iterations=2",
        "train.log_every=1",
        "eval.scales=[1.0, 1.25]",
        "tune.name=tiny-ablation",
        "tune.space={}",
        "tune.scheduler=none",
        "tune.seeds=[0, 1]",
        "tune.variants={fcn: [model.recurrence=0], axial_r1: [model.attention=axial, model.recurrence=1]}",
        "tune.baseline=fcn",
    ]
    config = load_config(None, settings)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        report = run_search(config)
        again = run_search(config)  # the same name: the grid is restored and no finished trial runs again
        before = _runs(tracking)
        # A seed added to the same search would never run (Tune restores its grid): refused before tracking.
        with pytest.raises(
            IdentityError, match=r"search 'tiny-ablation' .* tune.seeds \[0, 1\] -> \[0, 1, 2\]"
        ):
            run_search(load_config(None, [*settings, "tune.seeds=[0, 1, 2]"]))
        assert _runs(tracking) == before  # no run created or changed
        # The seed runs as a search of its own name (one variant of the study) ...
        more = [
            "tune.name=tiny-ablation-seed2",
            "tune.seeds=[2]",
            "tune.variants={fcn: [model.recurrence=0]}",
        ]
        run_search(load_config(None, [*settings, *more]))
    finally:
        ray.shutdown()
    # ... and `ccnet ablation` gathers both: the first search's table read back as it printed it, then fcn
    # over seeds 0, 1, 2 beside axial_r1's two pairs.
    assert study_report(config).table == report.ablation
    searches = ["--search", "tiny-ablation", "--search", "tiny-ablation-seed2"]
    args = build_parser().parse_args(["ablation", *(a for s in settings for a in ("--set", s)), *searches])
    capsys.readouterr()  # what Tune printed
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ablation of tiny-ablation (4 trials), tiny-ablation-seed2 (1 trials)")
    gathered = [line for line in printed.splitlines() if line.startswith(("| fcn ", "| axial_r1 "))]
    assert gathered[0].startswith("| fcn | 3 | ") and gathered[0].endswith("| 0,1,2 |")
    assert gathered[1].split(" | ")[4] == "2" and gathered[1].endswith("| 0,1 |")
    assert len(gathered) == 4  # both tables: per variant and per class

    trial_rows = report.table.splitlines()[2:]
    assert len(trial_rows) == 4  # 2 variants x 2 seeds, each once
    assert sorted(row.split(" | ")[1:3] for row in trial_rows) == [
        ["axial_r1", "0"],
        ["axial_r1", "1"],
        ["fcn", "0"],
        ["fcn", "1"],
    ]
    assert all("(failed)" not in row and " | - | " not in row for row in trial_rows)  # final figures there
    rows = report.ablation.splitlines()
    assert [row.split(" | ")[0] for row in rows[2:]] == ["| fcn", "| axial_r1"]
    assert all(row.endswith("| 0,1 |") for row in rows[2:])
    # The baseline reached the table: axial_r1 is compared with fcn over both seeds (2 pairs).
    assert "| Δ single vs fcn (pp, 95 % CI) |" in rows[0] and "| - | - | - | baseline |" in rows[2]
    assert rows[3].split(" | ")[4] == "2"
    # The attention at the end (none for the FCN) and each run's wall time, from what the trials reported.
    header = rows[0].split(" | ")
    attention, wall = header.index("attention at the end: γ / share"), header.index("wall per run (min)")
    fcn_cells, axial_cells = rows[2].split(" | "), rows[3].split(" | ")
    assert fcn_cells[attention] == "-" and axial_cells[attention].startswith("head ")
    assert float(fcn_cells[wall]) > 0 and float(axial_cells[wall]) > 0
    assert again.ablation == report.ablation and again.parent_run_id == report.parent_run_id

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("ccnet")
    runs = client.search_runs([experiment.experiment_id])
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == report.parent_run_id]
    assert sorted((c.data.tags["ccnet.variant"], c.data.tags["ccnet.seed"]) for c in children) == [
        ("axial_r1", "0"),
        ("axial_r1", "1"),
        ("fcn", "0"),
        ("fcn", "1"),
    ]
    for child in children:
        assert (
            child.info.run_name == f"tiny-ablation_{child.data.tags['ccnet.variant']}_seed"
            f"{child.data.tags['ccnet.seed']}"
        )
        axial = child.data.tags["ccnet.variant"] == "axial_r1"  # fcn: the preset's attention, as resolved
        assert (child.data.params["model.attention"], child.data.params["model.recurrence"]) == (
            ("axial", "1") if axial else ("criss_cross", "0")
        )
        assert "final/mIoU_ms_flip" in child.data.metrics
        # Each trial's description and, with attention, its diagnostics plot (2 iterations: never engaged).
        plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        note = child.data.tags["mlflow.note.content"]
        assert note.startswith(f"{config.model.name} (")
        assert ("plots/attention_diagnostics.png" in plots) == axial == ("Attention never engaged" in note)
        assert ("attention/head/share" in child.data.metrics) == axial
    artifacts = {a.path for a in client.list_artifacts(report.parent_run_id, "ablation")}
    assert artifacts == {
        "ablation/results.md",
        "ablation/results.csv",
        "ablation/chart.png",
        "ablation/per_class.md",
    }
    logged = client.download_artifacts(report.parent_run_id, "ablation/results.md", str(tmp_path))
    assert Path(logged).read_text() == report.ablation  # what the command prints is what MLflow holds
    per_class = client.download_artifacts(report.parent_run_id, "ablation/per_class.md", str(tmp_path))
    lines = Path(per_class).read_text().splitlines()
    assert lines[0].startswith("| variant | n | ")
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| fcn", "2"], ["| axial_r1", "2"]]


def test_tune_restore_leaves_the_search_lease_alone(tmp_path: Path) -> None:
    """Tune's restore copies the experiment folder's state files to its staging folder and uploads them back
    later; a lease among them was rewritten under its owner, who took that for a takeover (a resumed CamVid
    search lost its lease 20 s after the restore)."""
    import ray
    from ray.train._internal.storage import StorageContext
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from pipeline.io.lease import LEASE_FILE, RunLease

    experiment = tmp_path / "runs" / "search"
    experiment.mkdir(parents=True)
    (experiment / "experiment_state-2026-12-02.json").write_text("{}")  # what a restore must copy
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        with RunLease(str(experiment), "search 'search'") as lease:
            storage = StorageContext(str(tmp_path / "runs"), "search")
            _ExperimentCheckpointManager(storage=storage, checkpoint_period=10).sync_down_experiment_state()
            staged = sorted(path.name for path in Path(storage.experiment_driver_staging_path).iterdir())
            assert staged == ["experiment_state-2026-12-02.json"]  # Ray copies state files, not the lease
            assert (experiment / LEASE_FILE).exists() and not lease.lost.is_set()
    finally:
        ray.shutdown()
