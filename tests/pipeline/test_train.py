"""The training loop without Ray: steps, AMP levels, non-finite losses, exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ccnet import build_ccnet
from ccnet.losses import SegmentationLoss
from pipeline.checkpoints import CheckpointStore, load
from pipeline.config import Config, load_config
from pipeline.data.sources import build_source
from pipeline.data.writer import write_shards
from pipeline.train import LocalSession, NonFiniteLossError, poly_lr, run_uri, train_loop, train_step


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    source = build_source("generated", None, image_size=(48, 48), counts={"train": 12, "val": 4})
    uri, _ = write_shards(source, str(tmp_path_factory.mktemp("data")), workers=1, progress=False)
    return uri


def make_config(dataset: str, tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [
        f"data.uri={dataset}", "data.crop_size=48", "data.batch_size=4", "train.iterations=8",
        "train.log_every=1", "train.checkpoint_every=4", "train.eval_every=100", f"run.storage={tmp_path}",
        "run.ray=false", *overrides,
    ])


class Recorder:
    """Stands in for the MLflow tracker: keeps what the loop logs."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.setdefault(step, {}).update(metrics)

    def losses(self) -> dict[int, float]:
        return {step: m["train/loss"] for step, m in self.metrics.items() if "train/loss" in m}


def test_poly_lr() -> None:
    assert poly_lr(0.01, 0, 100, 0.9) == 0.01
    assert poly_lr(0.01, 50, 100, 0.9) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100, 0.9) == 0.0


def test_step_learns_and_skips_non_finite() -> None:
    torch.manual_seed(0)
    model = build_ccnet("ccnet_tiny", 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    loss_fn = SegmentationLoss()
    losses = [train_step(model, images, labels, loss_fn, optimizer, scaler, None).loss for _ in range(6)]
    assert losses[-1] < losses[0]
    with torch.no_grad():
        model.head.classifier.bias.fill_(float("nan"))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    step = train_step(model, images, labels, SegmentationLoss(), optimizer, scaler, None)
    assert not step.finite
    for name, p in model.named_parameters():  # no update applied
        assert torch.equal(p, before[name]) or torch.isnan(p).all(), name


@pytest.mark.parametrize("amp", ["O1", "O2"])
def test_mixed_precision_levels_train(dataset: str, tmp_path: Path, amp: str) -> None:
    recorder = Recorder()
    config = make_config(dataset, tmp_path, f"train.amp={amp}", "train.iterations=3")
    summary = train_loop(config, LocalSession(run_uri(config)), tracker=recorder)
    assert summary.iterations == 3 and summary.skipped_steps == 0
    assert all(torch.isfinite(torch.tensor(loss)) for loss in recorder.losses().values())


def test_repeated_non_finite_losses_stop_the_run(dataset: str, tmp_path: Path) -> None:
    config = make_config(dataset, tmp_path, "train.lr=1e12", "train.max_nonfinite=2", "train.iterations=40")
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 iterations in a row"):
        train_loop(config, LocalSession(run_uri(config)))


class CrashAfter(LocalSession):
    """Checkpoints like LocalSession, then dies right after the checkpoint of ``crash_at``."""

    crash_at = 4

    def checkpoint(self, state: dict[str, Any] | None, iteration: int, metrics: dict[str, float]) -> None:
        super().checkpoint(state, iteration, metrics)
        if iteration == self.crash_at:
            raise KeyboardInterrupt("simulated crash")


def test_resume_continues_exactly(dataset: str, tmp_path: Path) -> None:
    straight = Recorder()
    config = make_config(dataset, tmp_path, "run.name=straight")
    train_loop(config, LocalSession(run_uri(config)), tracker=straight)

    resumed = Recorder()
    config = make_config(dataset, tmp_path, "run.name=resumed")
    with pytest.raises(KeyboardInterrupt):
        train_loop(config, CrashAfter(run_uri(config)), tracker=resumed)
    assert sorted(resumed.losses()) == [1, 2, 3, 4]
    train_loop(config, LocalSession(run_uri(config)), tracker=resumed)

    assert resumed.losses() == straight.losses()  # the same losses at every iteration, 5..8 included
    final = {
        name: load(CheckpointStore(str(tmp_path / name)).latest())["model"]
        for name in ("straight", "resumed")
    }
    for key, value in final["straight"].items():
        assert torch.equal(value, final["resumed"][key]), key
