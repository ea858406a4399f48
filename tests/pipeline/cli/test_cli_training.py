"""``ccnet train``, ``evaluate`` and ``predict`` end to end, without Ray, on the embedded default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli.main import main
from pipeline.io.checkpoints import load

QUICKSTART = str(Path(__file__).parents[3] / "configs" / "quickstart_ccnet-tiny_generated-192x192_cpu.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli")
    data = str(root / "datasets")
    assert (
        main(
            [
                "data",
                "prepare",
                "--dataset",
                "generated",
                "--out",
                data,
                "--count",
                "train=8,val=3",
                "--image-size",
                "48",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    settings = [
        f"data.uri={data}/generated/v1",
        "data.crop_size=48",
        "data.batch_size=4",
        "data.loader_workers=0",
        "train.iterations=4",
        "train.checkpoint_every=2",
        "train.eval_every=2",
        "eval.scales=[1.0, 1.25]",
        f"run.storage={root / 'runs'}",
        "run.ray=false",
        f"tracking.uri={tracking}",
    ]
    assert main(["train", "-c", QUICKSTART, *[arg for s in settings for arg in ("--set", s)]]) == 0
    checkpoint = root / "runs" / "quickstart_ccnet-tiny-r2" / "best" / "checkpoint.pt"
    return {
        "root": str(root),
        "checkpoint": str(checkpoint),
        "tracking": tracking,
        "data": data,
        "settings": "\n".join(settings),
    }


def test_the_registry_compares_like_with_like(trained: dict[str, str]) -> None:
    """The quickstart's R=2 and R=0 runs are two versions of one model (ccnet-<dataset>), tagged with their
    variant, dataset version and protocol; champion goes to the better one, and never to a version scored
    under another protocol (here without the flip), however it scores."""
    from mlflow.tracking import MlflowClient

    # Their own experiment and registered model name (tracking.registered_model): the other tests' stay as
    # the fixture left them.
    settings = [
        *trained["settings"].splitlines(),
        "tracking.experiment=registry",
        "tracking.registered_model=registry-test",
    ]
    for extra in (
        ["run.name=registry-r2"],
        ["model.recurrence=0", "run.name=registry-r0"],
        ["eval.flip=false", "run.name=registry-r2-noflip"],
    ):
        assert main(["train", "-c", QUICKSTART, *[a for s in [*settings, *extra] for a in ("--set", s)]]) == 0
    client = MlflowClient(trained["tracking"])
    versions = sorted(client.search_model_versions("name = 'registry-test'"), key=lambda v: int(v.version))
    assert [v.tags["ccnet.variant"] for v in versions] == [
        "criss_cross R=2 head os8",
        "fcn os8",
        "criss_cross R=2 head os8",
    ]
    assert {v.tags["ccnet.dataset"] for v in versions} == {"generated/v1"}
    assert (
        versions[0].tags["ccnet.protocol"]
        == versions[1].tags["ccnet.protocol"]
        != versions[2].tags["ccnet.protocol"]
    )
    scores = [client.get_run(v.run_id).data.metrics["final/mIoU_ms_flip"] for v in versions]  # unrounded
    champion = client.get_model_version_by_alias("registry-test", "champion")
    assert str(champion.version) == ("1" if scores[0] >= scores[1] else "2")
    assert str(client.get_model_version_by_alias("registry-test", "candidate").version) == "3"
    names = {client.get_logged_model(v.model_id or v.source.removeprefix("models:/")).name for v in versions}
    assert names == {"criss_cross-R2-head-os8", "fcn-os8"}


def test_train_records_a_run(trained: dict[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["tracking"])
    experiment = client.get_experiment_by_name("quickstart")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.iterations"] == "4"
    # What a user decides from: the model as built, a variant tag, a description with the results, where
    # the run came from, and the dataset version as inputs; no tracking or search settings among the params.
    params, tags = run.data.params, run.data.tags
    assert (params["model.attention"], params["model.recurrence"], params["model.backbone"]) == (
        "criss_cross",
        "2",
        "tiny",
    )
    assert not any(key.startswith(("tracking.", "tune.")) for key in params)
    assert tags["ccnet.variant"] == "criss_cross R=2 head os8" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] and "mlflow.user" in tags  # the command line's program (pytest here)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=False
    ).stdout.strip()
    assert tags.get("mlflow.source.git.commit") == (head or None)
    note = tags["mlflow.note.content"]
    assert "ccnet_tiny (criss_cross R=2 head os8) trained 4 iterations on generated v1 train" in note
    assert "single-scale" in note and "multi-scale+flip" in note
    inputs = {
        (d.dataset.name, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in run.inputs.dataset_inputs
    }
    assert inputs == {("generated/v1/train", "training"), ("generated/v1/val", "validation")}
    assert experiment.tags["mlflow.note.content"].startswith("CCNet (criss-cross attention) trainings")
    # Which step made best, and the checkpoint bytes stored once: last only when it differs from best.
    best_iteration = int(tags["ccnet.best.iteration"])
    assert best_iteration in (2, 4) and 0 <= float(tags["ccnet.best.val_mIoU"]) <= 1
    stored = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert stored == {"checkpoints/best"} | ({"checkpoints/last"} if best_iteration != 4 else set())
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/mIoU")}
    assert list(history) == [2, 4]
    # The final results once, under short names; single-scale is the validation that made best, not rerun.
    final = {key for key in run.data.metrics if key.startswith("final/")}
    assert {"final/mIoU_ss", "final/mIoU_ms_flip", "final/pixel_accuracy_ss"} <= final
    assert not any("single-scale" in key or "multi-scale" in key for key in final)
    assert run.data.metrics["final/mIoU_ss"] == history[best_iteration]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert names == {
        "plots/confusion_matrix.png",
        "plots/predictions.png",
        "plots/attention.png",
        "plots/attention_diagnostics.png",
    }
    # The attention's diagnostics at each validation, and a sentence in the description when it never engaged.
    shares = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "attention/head/share")}
    assert list(shares) == [2, 4]
    assert ("Attention never engaged: head share" in note) == (max(shares.values()) < 0.05)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts >= {"config.yaml", "checkpoints", "evaluation", "plots"}
    # The segmenter (registered), the ONNX graph and the pt2 program, named after the variant.
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert {model.source_run_id for model in models} == {run.info.run_id}
    variant = "criss_cross-R2-head-os8"
    assert sorted(model.name for model in models) == [variant, f"{variant}-onnx", f"{variant}-pt2"]
    assert {model.metrics[0].key for model in models} <= {"val_mIoU", "val_mIoU_single_scale"}


def test_evaluate_prints_and_records_the_table(
    trained: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--checkpoint", trained["checkpoint"], "--set", "eval.flip=false"]) == 0
    out = capsys.readouterr().out
    assert "| single-scale | whole | 1 | no | 3 |" in out
    assert "| multi-scale+flip | whole | 1, 1.25 | no | 3 |" in out
    from mlflow.tracking import MlflowClient

    client = MlflowClient(trained["tracking"])
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    recorded = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert f"evaluation/iteration_{load(trained['checkpoint'])['iteration']:07d}.md" in recorded


def test_predict_writes_masks_and_overlays(trained: dict[str, str], tmp_path: Path) -> None:
    image = tmp_path / "street.png"
    Image.new("RGB", (40, 30), (90, 90, 90)).save(image)
    out = str(tmp_path / "out")
    assert main(["predict", str(image), "--checkpoint", trained["checkpoint"], "--out", out]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["street_mask.png", "street_overlay.png"]
    assert Image.open(tmp_path / "out" / "street_mask.png").size == (40, 30)


def test_predict_and_evaluate_take_the_registered_champion(
    trained: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The training registered its best model; its checkpoint (not the pickled model) is what they load."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["tracking"])
    image = tmp_path / "street.png"
    Image.new("RGB", (40, 30), (90, 90, 90)).save(image)
    champion = "models:/ccnet-generated@champion"
    assert main(["predict", str(image), "--checkpoint", champion, "--out", str(tmp_path / "a")]) == 0
    best = trained["checkpoint"]
    assert main(["predict", str(image), "--checkpoint", best, "--out", str(tmp_path / "b")]) == 0
    for name in ("street_mask.png", "street_overlay.png"):  # the same weights as the best checkpoint
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert main(["evaluate", "--checkpoint", champion, "--no-tracking", "--set", "eval.flip=false"]) == 0
    assert "| single-scale | whole | 1 | no | 3 |" in capsys.readouterr().out
    assert (
        main(
            [
                "predict",
                str(image),
                "--checkpoint",
                "models:/no-such-model@champion",
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
    assert "models:/no-such-model@champion: no registered model checkpoint" in caplog.text


def test_checkpoint_of_another_model_is_one_line(trained: dict[str, str]) -> None:
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "evaluate",
        "--checkpoint",
        trained["checkpoint"],
        "--set",
        "model.recurrence=0",
        "--no-tracking",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR ") and "--set would change model" in last  # before any weights load
    assert "recurrence 2 -> 0" in last


def test_export_and_predict_with_onnxruntime(
    trained: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """``ccnet export`` of a checkpoint and of the registered champion; ``predict`` on the .onnx file (and
    with --backend onnx on the checkpoint) paints the masks PyTorch paints, multi-scale + flip included."""
    import numpy as np
    import onnx

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained["tracking"])
    image = tmp_path / "street.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(image)  # not multiples of 8
    exported = tmp_path / "model.onnx"
    with caplog.at_level("INFO"):
        assert main(["export", "--checkpoint", trained["checkpoint"], "--out", str(exported)]) == 0
    assert "onnxruntime vs PyTorch: max |logit difference|" in caplog.text
    metadata = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    assert metadata["ccnet.variant"] == "criss_cross R=2 head os8" and metadata["ccnet.num_classes"] == str(
        load(trained["checkpoint"])["num_classes"]
    )
    assert (
        main(
            [
                "export",
                "--checkpoint",
                "models:/ccnet-generated@champion",
                "--out",
                str(tmp_path / "champion.onnx"),
            ]
        )
        == 0
    )
    for scales in ([], ["--multi-scale"]):
        outputs = {}
        backends = {
            "torch": ["--checkpoint", trained["checkpoint"]],
            "onnx-file": ["--checkpoint", str(exported)],
            "onnx-backend": ["--checkpoint", trained["checkpoint"], "--backend", "onnx"],
        }
        for name, args in backends.items():
            outputs[name] = tmp_path / f"{name}{len(scales)}"
            assert main(["predict", str(image), *args, "--out", str(outputs[name]), *scales]) == 0
        masks = {name: np.asarray(Image.open(folder / "street_mask.png")) for name, folder in outputs.items()}
        for name in ("onnx-file", "onnx-backend"):
            assert (masks[name] == masks["torch"]).all(axis=-1).mean() >= 0.999, name


def test_export_refuses_to_replace_a_file_it_did_not_write(
    trained: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notes = tmp_path / "notes.onnx"
    notes.write_text("mine")
    assert main(["export", "--checkpoint", trained["checkpoint"], "--out", str(notes)]) == 2
    assert "is not an ONNX model ccnet exported; not replaced" in caplog.text and notes.read_text() == "mine"
    assert main(["predict", str(notes), "--checkpoint", str(notes), "--out", str(tmp_path / "o")]) == 2
    assert f"{notes}: onnxruntime cannot load it" in caplog.text
