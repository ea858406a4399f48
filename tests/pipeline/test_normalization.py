"""The input normalisation comes from the backbone's description: training transforms, the checkpoint,
evaluation and ``ccnet predict`` all take it from there (EfficientNet-Lite expects [-1, 1], ResNets ImageNet
mean/std)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

import pipeline.eval.predict
import pipeline.train.build
from pipeline.cli.main import main
from pipeline.config import load_config
from pipeline.config.model import input_normalization
from pipeline.data.readers import ShardDataset
from pipeline.eval.checkpoint import evaluate_checkpoint
from pipeline.io.checkpoints import CheckpointStore, load, save_file
from pipeline.train.loop import train_loop
from pipeline.train.sessions import LocalSession
from pipeline.train.spec import RunSpec

LITE = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def spy_on_normalisation(patch: pytest.MonkeyPatch, module: object, name: str) -> list[tuple]:
    """Wrap ``module.name`` to record the ``(mean, std)`` keywords of each call; returns the record."""
    seen: list[tuple] = []
    real = getattr(module, name)

    def spy(*args: object, **kwargs: Any) -> object:
        given = kwargs.get("normalization")  # predict_images takes a Normalization
        mean, std = (given.mean, given.std) if given else (kwargs["mean"], kwargs["std"])
        seen.append((tuple(mean), tuple(std)))
        return real(*args, **kwargs)

    patch.setattr(module, name, spy)
    return seen


@pytest.fixture(scope="module")
def dataset(generated_dataset: Callable[..., str]) -> str:
    return generated_dataset(size=32, train=4, val=2, test=1)


@pytest.fixture(scope="module")
def lite_run(dataset: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[object, str, list]:
    """Two iterations of fcn_lite0_d16 (no ImageNet file needed), spying on the train transform's mean/std."""
    storage = tmp_path_factory.mktemp("runs")
    config = load_config(
        None,
        [
            f"data.uri={dataset}",
            "data.crop_size=32",
            "data.batch_size=2",
            "train.iterations=2",
            "train.checkpoint_every=2",
            "train.eval_every=2",
            f"run.storage={storage}",
            "run.ray=false",
            "model.name=fcn_lite0_d16",
            "model.pretrained=none",
            "eval.scales=[1.0]",
            "eval.flip=false",
        ],
    )
    with pytest.MonkeyPatch.context() as patch:
        seen = spy_on_normalisation(patch, pipeline.train.build, "build_train_transform")
        spec = RunSpec.of(config)
        train_loop(spec, LocalSession(spec.run_uri))
    return config, CheckpointStore(spec.run_uri).best_uri(), seen


def test_the_backbone_decides_the_normalisation(dataset: str) -> None:
    assert input_normalization(load_config(None, ["model.name=ccnet_lite2_d16"])).mean == LITE[0]
    resnet = input_normalization(load_config(None, ["model.name=ccnet_r50_d8"]))
    assert resnet.mean == (0.485, 0.456, 0.406) and resnet.std == (0.229, 0.224, 0.225)


def test_training_normalises_as_the_backbone_expects_and_the_checkpoint_says_so(lite_run: tuple) -> None:
    _, best, seen = lite_run
    assert seen == [LITE]
    assert load(best)["normalization"] == {"mean": list(LITE[0]), "std": list(LITE[1])}


def test_evaluation_uses_the_checkpoints_normalisation(lite_run: tuple, tmp_path: Path) -> None:
    config, best, _ = lite_run
    state = load(best)
    state["normalization"] = {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}  # plain [0, 1] images
    path = save_file(tmp_path, state)
    _, dataset, _ = evaluate_checkpoint(config, str(path), split="test")
    assert dataset.split == "test" and len(dataset) == 1
    raw = ShardDataset(config.data.uri, "test")[0]["image"]  # (3, H, W) uint8, as decoded
    torch.testing.assert_close(dataset[0]["image"], raw.float() / 255)


def test_predict_normalises_from_the_checkpoint(lite_run: tuple, tmp_path: Path) -> None:
    config, best, _ = lite_run
    frame = tmp_path / "frame.png"
    Image.new("RGB", (32, 24), (200, 30, 90)).save(frame)
    with pytest.MonkeyPatch.context() as patch:
        seen = spy_on_normalisation(patch, pipeline.eval.predict, "predict_images")
        assert main(["predict", str(frame), "--checkpoint", best, "--out", str(tmp_path / "out")]) == 0
    assert seen == [LITE] and (tmp_path / "out" / "frame_overlay.png").exists()


def test_evaluate_the_test_split_from_the_command_line(
    lite_run: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    _, best, _ = lite_run
    assert main(["evaluate", "--checkpoint", best, "--split", "test", "--no-tracking"]) == 0
    out = capsys.readouterr().out
    assert "| single-scale | whole | 1 | no | 1 |" in out  # the one test image, not the 2 of val
