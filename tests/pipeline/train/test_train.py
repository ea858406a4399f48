"""The training loop without Ray: steps, AMP levels, non-finite losses, exact resume."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ccnet import build_ccnet
from ccnet.diagnostics import FIGURES
from ccnet.losses import SegmentationLoss
from pipeline.config import Config, load_config
from pipeline.config.model import warn_if_not_pretrained
from pipeline.data.balance import class_pixels, median_frequency_weights
from pipeline.io.checkpoints import CheckpointStore, load
from pipeline.train.build import build_loss, build_training
from pipeline.train.loop import NonFiniteLossError, poly_lr, train_loop, train_step
from pipeline.train.record import log_run_context
from pipeline.train.sessions import LocalSession
from pipeline.train.spec import RunSpec


def _run_uri(config: Config) -> str:
    return RunSpec.of(config).run_uri


def _train(config: Config, session: type = LocalSession, **kwargs: Any) -> Any:
    """The loop in this process, as a run without Ray runs it."""
    spec = RunSpec.of(config)
    return train_loop(spec, session(spec.run_uri), **kwargs)


@pytest.fixture(scope="module")
def dataset(generated_dataset: Callable[..., str]) -> str:
    return generated_dataset(size=48, train=12, val=4)


def make_config(dataset: str, tmp_path: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            f"data.uri={dataset}",
            "data.crop_size=48",
            "data.batch_size=4",
            "train.iterations=8",
            "train.log_every=1",
            "train.checkpoint_every=4",
            "train.eval_every=100",
            f"run.storage={tmp_path}",
            "run.ray=false",
            *overrides,
        ],
    )


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
    summary = _train(config, LocalSession, tracker=recorder)
    assert summary.iterations == 3 and summary.skipped_steps == 0
    assert all(torch.isfinite(torch.tensor(loss)) for loss in recorder.losses().values())


def test_repeated_non_finite_losses_stop_the_run(dataset: str, tmp_path: Path) -> None:
    config = make_config(dataset, tmp_path, "train.lr=1e12", "train.max_nonfinite=2", "train.iterations=40")
    with pytest.raises(NonFiniteLossError, match="non-finite for 2 iterations in a row"):
        _train(config, LocalSession)


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
    _train(config, LocalSession, tracker=straight)

    resumed = Recorder()
    config = make_config(dataset, tmp_path, "run.name=resumed")
    with pytest.raises(KeyboardInterrupt):
        _train(config, CrashAfter, tracker=resumed)
    assert sorted(resumed.losses()) == [1, 2, 3, 4]
    trained = load(CheckpointStore(str(tmp_path / "resumed")).latest())["train_seconds"]  # up to iteration 4
    _train(config, LocalSession, tracker=resumed)

    assert resumed.losses() == straight.losses()  # the same losses at every iteration, 5..8 included
    # The seconds trained go on from the checkpoint's (the lost fifth step is not counted twice).
    assert straight.metrics[8]["train/seconds_before_start"] == 0.0 < straight.metrics[8]["train/seconds"]
    assert (
        0.0
        < trained
        == resumed.metrics[8]["train/seconds_before_start"]
        < resumed.metrics[8]["train/seconds"]
    )
    last = load(CheckpointStore(str(tmp_path / "resumed")).latest())
    assert last["iteration"] == 8 and last["train_seconds"] >= resumed.metrics[8]["train/seconds"]
    final = {
        name: load(CheckpointStore(str(tmp_path / name)).latest())["model"]
        for name in ("straight", "resumed")
    }
    for key, value in final["straight"].items():
        assert torch.equal(value, final["resumed"][key]), key


def test_attention_diagnostics_at_each_validation_and_one_warning_when_never_engaged(
    dataset: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    config = make_config(
        dataset, tmp_path, "train.iterations=4", "train.eval_every=2", "train.checkpoint_every=2"
    )
    crashing = CrashAfter(_run_uri(config))
    crashing.crash_at = 2  # after the first validation: the diagnostics so far go on with the checkpoint
    with caplog.at_level(logging.WARNING, logger="pipeline.train.loop"):
        with pytest.raises(KeyboardInterrupt):
            train_loop(RunSpec.of(config), crashing, tracker=recorder)
        summary = _train(config, LocalSession, tracker=recorder)

    names = {f"attention/head/{figure}" for figure in FIGURES}  # ccnet_tiny: criss-cross R=2 in the head
    assert sorted(step for step, metrics in recorder.metrics.items() if names <= set(metrics)) == [2, 4]
    assert not any(name.startswith("attention/") for step in (1, 3) for name in recorder.metrics[step])
    assert summary.attention == {name: recorder.metrics[4][name] for name in names}
    assert summary.attention["attention/head/share"] < 0.05  # gamma starts at 0 and 4 steps barely move it
    history = load(CheckpointStore(_run_uri(config)).latest())["attention_history"]
    assert [iteration for iteration, _ in history] == [2, 4]  # the resumed run kept the first validation's
    assert history[0][1] == {name: recorder.metrics[2][name] for name in names}
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("attention never engaged: head share ")
    assert "over 2 measurements" in warnings[0]


def test_category_consistent_loss_trains_on_the_generated_set(dataset: str, tmp_path: Path) -> None:
    recorder = Recorder()
    config = make_config(
        dataset, tmp_path, "model.embedding_channels=8", "train.consistency_weight=1.0", "train.iterations=2"
    )
    summary = _train(config, LocalSession, tracker=recorder)
    assert summary.skipped_steps == 0
    for metrics in recorder.metrics.values():
        parts = {name: metrics[f"train/loss_{name}"] for name in ("main", "aux", "var", "dis", "reg")}
        assert all(math.isfinite(value) for value in [metrics["train/loss"], *parts.values()])
        assert parts["var"] + parts["dis"] + parts["reg"] > 0  # the term is there, not a zero placeholder
        # train/loss = main + 0.4 aux + 1.0 var + 1.0 dis + 0.001 reg
        expected = parts["main"] + 0.4 * parts["aux"] + parts["var"] + parts["dis"] + 0.001 * parts["reg"]
        assert metrics["train/loss"] == pytest.approx(expected, rel=1e-5)


def test_build_loss_reads_the_train_section(dataset: str, tmp_path: Path) -> None:
    off = build_loss(make_config(dataset, tmp_path), ignore_index=7)
    assert (off.ignore_index, off.consistency, off.ohem) == (7, False, False)
    on = build_loss(
        make_config(
            dataset,
            tmp_path,
            "model.embedding_channels=8",
            "train.consistency_weight=2",
            "train.ohem=true",
            "train.ohem_min_kept=123",
        ),
        ignore_index=255,
    )
    assert on.consistency and on.consistency_weights == (2.0, 2.0, 0.002)
    assert on.ohem and on.ohem_min_kept == 123


class ContextRecorder:
    """Keeps the dicts a run's context logs (the tracker verbs log_run_context uses)."""

    def __init__(self) -> None:
        self.dicts: dict[str, dict] = {}

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self.dicts[artifact_file] = data

    def log_params(self, *_: Any) -> None: ...
    def set_tags(self, *_: Any) -> None: ...
    def log_text(self, *_: Any) -> None: ...
    def log_dataset(self, *_: Any) -> None: ...


def test_median_frequency_class_weights_go_from_the_spec_to_the_loss_and_the_record(
    dataset: str, tmp_path: Path
) -> None:
    config = make_config(dataset, tmp_path, "train.class_weights=median_frequency", "train.iterations=2")
    spec = RunSpec.of(config)
    expected = median_frequency_weights(class_pixels(dataset, spec.manifest, "train"))
    assert spec.class_weights == expected and len(expected) == spec.manifest.num_classes
    assert len(set(expected)) > 1  # the generated classes are not balanced: the weights differ
    training = build_training(spec, LocalSession(spec.run_uri))
    assert training.loss_fn.class_weights is not None
    assert training.loss_fn.class_weights.tolist() == pytest.approx(expected)
    recorder = ContextRecorder()
    log_run_context(recorder, spec)  # type: ignore[arg-type]
    recorded = recorder.dicts["class_weights.json"]
    assert recorded["method"] == "median_frequency"
    assert recorded["weights"] == dict(zip(spec.manifest.classes, expected, strict=True))
    assert train_loop(spec, LocalSession(spec.run_uri)).skipped_steps == 0
    unweighted = RunSpec.of(make_config(dataset, tmp_path))
    assert unweighted.class_weights is None and build_loss(unweighted.config, 255).class_weights is None
    log_run_context(recorder := ContextRecorder(), unweighted)  # type: ignore[arg-type]
    assert "class_weights.json" not in recorder.dicts


@pytest.mark.parametrize(
    ("overrides", "warns"),
    [
        (["model.name=ccnet_r101_deepstem_d8"], True),  # a paper recipe, no weights
        (["model.name=fcn_r50_d8"], True),
        (["model.name=ccnet_r101_deepstem_d8", "model.pretrained=none"], False),  # no weights on purpose
        (["model.name=ccnet_r101_deepstem_d8", "model.pretrained=/data/r101.pth"], False),
        (["model.name=ccnet_tiny"], False),  # the tiny backbone trains from scratch by design
    ],
)
def test_missing_imagenet_weights_warn_once_naming_the_key(
    caplog: pytest.LogCaptureFixture, overrides: list[str], warns: bool
) -> None:
    config = load_config(None, overrides)
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        assert warn_if_not_pretrained(config) is warns
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == int(warns)
    if warns:
        assert "model.pretrained" in warnings[0].getMessage() and "\n" not in warnings[0].getMessage()


class _Ends:
    """Records the status a run is ended with."""

    def __init__(self) -> None:
        self.status: str | None = None

    def end(self, status: str = "FINISHED") -> None:
        self.status = status


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (None, "FINISHED"),
        (KeyboardInterrupt(), "KILLED"),
        (SystemExit(0), "KILLED"),
        (SystemExit(None), "KILLED"),
        (SystemExit(1), "FAILED"),
        (RuntimeError("boom"), "FAILED"),
    ],
)
def test_a_run_ends_killed_when_stopped_from_outside(error: BaseException | None, status: str) -> None:
    """Tune stops a trial by ending its thread with sys.exit(0): the trial's run is KILLED like one stopped by
    Ctrl-C, not FAILED (an interrupted search must leave no FAILED trial behind)."""
    from pipeline.train.context import ended_with_status

    tracker = _Ends()
    try:
        with ended_with_status(tracker):  # type: ignore[arg-type]
            if error is not None:
                raise error
    except BaseException as raised:
        assert raised is error
    assert tracker.status == status
