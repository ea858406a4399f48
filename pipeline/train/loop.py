"""The training loop: plain PyTorch, the same in one process and in every Ray Train worker.

    summary = train_loop(spec, LocalSession(spec.run_uri), run_id=None)     # no Ray
    # Ray: pipeline.train.ray_train runs train_loop(spec, RaySession(...), run_id) in each worker

:func:`train_loop` builds the training (:func:`pipeline.train.build.build_training`) and hands the built
objects to :func:`run_loop`, which reads only the recipe (``train``) and validation (``eval``) sections.
Recipe (the paper's): SGD with momentum and weight decay, poly learning rate ``lr * (1 - it / max_it)^power``
set every iteration, main + 0.4 x aux cross-entropy (OHEM and the category-consistent loss optional),
iteration-based, seeded. Mixed precision levels (apex names): O0 float32; O1 float16 autocast with a
GradScaler; O2 bfloat16 autocast (no scaler: bf16 has float32's range). A non-finite loss skips the step;
``max_nonfinite`` in a row stop the run. Every checkpoint, periodic and best, goes through the session.
Every validation also measures the attention (:mod:`ccnet.diagnostics`), and a run whose attention never
engaged ends with one WARNING saying so.
"""

from __future__ import annotations

import logging
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ccnet.diagnostics import attention_diagnostics, never_engaged_note
from ccnet.losses import SegmentationLoss
from pipeline.config import EvalConfig, TrainConfig
from pipeline.eval.evaluation import EvalProtocol, evaluate
from pipeline.eval.results import VAL_MIOU, EvalResult
from pipeline.tracking.base import NullTracker, Tracker
from pipeline.train.build import Training, build_training
from pipeline.train.sessions import Session, rng_states
from pipeline.train.spec import RunSpec

log = logging.getLogger(__name__)

AMP_DTYPES: dict[str, torch.dtype | None] = {"O0": None, "O1": torch.float16, "O2": torch.bfloat16}


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for too many iterations in a row."""


@dataclass
class TrainSummary:
    iterations: int
    final_loss: float
    best_miou: float | None
    val_miou: float | None
    images_per_second: float
    skipped_steps: int
    attention: dict[str, float] = field(default_factory=dict)  # the diagnostics of the last validation


def peak_memory_mib(device: torch.device) -> float:
    """The most memory this process has held: the CUDA allocator's peak on a GPU, else the peak resident set
    size of the process (a Ray Train worker is a process of its own), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float) -> float:
    """``base_lr * (1 - iteration / max_iterations) ** power``."""
    return base_lr * (1 - iteration / max_iterations) ** power


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Each named parameter group's current learning rate, as ``train/lr/<group>`` metrics."""
    return {f"train/lr/{group['name']}": group["lr"] for group in optimizer.param_groups if "name" in group}


@dataclass
class Step:
    """One optimisation step's components, from :func:`train_step`."""

    loss: float
    parts: dict[str, float]
    finite: bool


def train_step(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: SegmentationLoss,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    amp_dtype: torch.dtype | None,
) -> Step:
    """Forward, loss, backward, update. A non-finite loss skips the update (and returns finite=False)."""
    optimizer.zero_grad(set_to_none=True)
    device_type = images.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        outputs = model(images)
    # The loss in float32: cross-entropy over many pixels loses precision in half types.
    losses = loss_fn({key: value.float() for key, value in outputs.items()}, labels)
    loss = losses["loss"]
    parts = {name: float(value.detach()) for name, value in losses.items() if name != "loss"}
    if not torch.isfinite(loss):
        return Step(float(loss.detach()), parts, finite=False)
    scaler.scale(loss).backward()
    scaler.step(optimizer)  # with O1, skipped by the scaler when gradients overflowed
    scaler.update()
    return Step(float(loss.detach()), parts, finite=True)


class _Validation:
    """Validates the model on the val set; the result of an iteration goes into that iteration's checkpoints
    (the final results reuse the best one's). Rank 0 also measures the attention (:mod:`ccnet.diagnostics`)
    on one fixed image, and keeps the figures in the training's ``attention_history``."""

    def __init__(
        self, training: Training, eval_config: EvalConfig, session: Session, amp_dtype: torch.dtype | None
    ) -> None:
        self.training, self.session, self.amp_dtype = training, session, amp_dtype
        self.protocol = EvalProtocol.single_scale(eval_config)
        self.latest: tuple[int, EvalResult] | None = None

    def __call__(self, iteration: int) -> dict[str, float]:
        """mIoU, pixel accuracy and per-class IoU; classes absent from the images (NaN) are left out. On rank
        0, the attention diagnostics (``attention/<place>/<figure>``) too, when the model has attention."""
        training, session = self.training, self.session
        result = evaluate(
            training.model,
            training.val_data,
            self.protocol,
            num_classes=training.num_classes,
            ignore_index=training.ignore_index,
            device=session.device,
            rank=session.rank,
            world_size=session.world_size,
            progress=False,
            amp_dtype=self.amp_dtype,
        )
        self.latest = (iteration, result)
        metrics = {name: value for name, value in result.as_metrics("val").items() if not math.isnan(value)}
        if session.rank == 0 and len(training.val_data) > 0:
            diagnostics = attention_diagnostics(training.model, self.probe())
            if diagnostics:
                training.attention_history.append((iteration, diagnostics))
            metrics |= diagnostics
        training.model.train()
        return metrics

    def probe(self) -> torch.Tensor:
        """What the attention diagnostics look at, the same at every validation so that their curves compare
        like with like: the first val image's centre, at most ``eval.crop_size`` square (a sliding window's
        size, which bounds the cost on large images), (1, 3, h, w) on the session's device."""
        image = self.training.val_data[0]["image"]  # (3, H, W), normalised
        crop = self.protocol.crop_size
        top, left = max(0, (image.shape[1] - crop) // 2), max(0, (image.shape[2] - crop) // 2)
        return image[None, :, top : top + crop, left : left + crop].to(self.session.device)

    def state_at(self, iteration: int) -> dict | None:
        return self.latest[1].state() if self.latest and self.latest[0] == iteration else None


class _Throughput:
    """Images per second over each logging window (all workers' images), and their median for the run."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.rates: list[float] = []
        self.start, self.images, self.latest = time.perf_counter(), 0, 0.0

    def count(self, batch_images: int) -> None:
        self.images += batch_images * self.world_size

    def close_window(self) -> float:
        self.latest = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.rates.append(self.latest)
        self.start, self.images = time.perf_counter(), 0
        return self.latest


def _save(
    session: Session,
    training: Training,
    iteration: int,
    validation: _Validation,
    report: dict[str, float] | None = None,
) -> None:
    """A checkpoint through the session: the best one (``report`` None) or a periodic one with ``report``.
    Every rank calls it: the ranks' random states are gathered (a collective)."""
    rng = rng_states(session)  # every rank's: a resumed run draws what this one would have
    state = training.state(iteration, rng, validation.state_at(iteration)) if session.rank == 0 else None
    if report is None:
        if state is not None:
            session.save_best(state)
    else:
        session.checkpoint(state, iteration, report)


def _check_finite(step: Step, iteration: int, nonfinite: int, limit: int) -> None:
    log.warning("iteration %d: non-finite loss %s, step skipped", iteration, step.loss)
    if nonfinite >= limit:
        raise NonFiniteLossError(
            f"loss was non-finite for {nonfinite} iterations in a row (last at "
            f"{iteration}); lower train.lr or use train.amp=O0/O2"
        )


def run_loop(
    training: Training, recipe: TrainConfig, eval_config: EvalConfig, session: Session, tracker: Tracker
) -> TrainSummary:
    """Train ``training`` to ``recipe.iterations``: log every ``log_every``, validate every ``eval_every``
    (a better val mIoU saves the best checkpoint), checkpoint every ``checkpoint_every`` and at the end; then
    one WARNING when the attention never engaged (:func:`ccnet.diagnostics.never_engaged`). The seconds
    trained go into every checkpoint (``training.seconds``) and, at the end, into ``train/seconds`` (every
    start's, up to its last checkpoint) and ``train/seconds_before_start`` (the earlier starts' alone)."""
    amp_dtype = AMP_DTYPES[recipe.amp]
    before, started = training.seconds, time.perf_counter()

    def clock() -> None:  # what the next checkpoint carries
        training.seconds = before + time.perf_counter() - started

    validate = _Validation(training, eval_config, session, amp_dtype)
    throughput = _Throughput(session.world_size)
    nonfinite = skipped = 0
    loss_value, val_miou, iteration = float("nan"), None, training.start
    training.model.train()
    for images, labels in training.batches:
        lr = poly_lr(recipe.lr, iteration, recipe.iterations, recipe.poly_power)
        for group in training.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        step = train_step(
            training.trained, images, labels, training.loss_fn, training.optimizer, training.scaler, amp_dtype
        )
        iteration += 1
        throughput.count(images.shape[0])
        if not step.finite:
            nonfinite, skipped = nonfinite + 1, skipped + 1
            _check_finite(step, iteration, nonfinite, recipe.max_nonfinite)
            continue
        nonfinite, loss_value, last = 0, step.loss, iteration == recipe.iterations
        metrics: dict[str, float] = {}
        if iteration % recipe.log_every == 0 or last:
            metrics = {
                "train/loss": step.loss,
                "train/lr": lr,
                **group_lrs(training.optimizer),
                "train/images_per_second": throughput.close_window(),
                **{f"train/loss_{name}": value for name, value in step.parts.items()},
            }
            if session.rank == 0:
                log.info(
                    "iteration %d/%d loss %.4f lr %.5f %.1f img/s",
                    iteration,
                    recipe.iterations,
                    step.loss,
                    lr,
                    throughput.latest,
                )
        if iteration % recipe.eval_every == 0 or last:
            metrics.update(validate(iteration))
            val_miou = metrics.get(VAL_MIOU)  # absent when no validation pixel is labelled
            if val_miou is not None and (training.best_miou is None or val_miou > training.best_miou):
                training.best_miou = val_miou  # every rank takes this branch: val mIoU is the global one
                clock()
                _save(session, training, iteration, validate)
        if last:  # what the run cost, for ablation tables
            metrics["train/median_images_per_second"] = statistics.median(throughput.rates)
            metrics["train/peak_memory_mib"] = peak_memory_mib(session.device)
            clock()
            metrics |= {"train/seconds": training.seconds, "train/seconds_before_start": before}
        if session.rank == 0 and metrics:
            tracker.log_metrics(metrics, step=iteration)
        if iteration % recipe.checkpoint_every == 0 or last:
            # The latest val mIoU goes with every report: a search's scheduler reads it at each one.
            latest = {VAL_MIOU: val_miou} if val_miou is not None else {}
            clock()
            _save(session, training, iteration, validate, {"iteration": iteration, **latest, **metrics})
    history = training.attention_history
    unengaged = never_engaged_note([diagnostics for _, diagnostics in history])
    if session.rank == 0 and unengaged:
        log.warning(unengaged)
    return TrainSummary(
        iteration,
        loss_value,
        training.best_miou,
        val_miou,
        throughput.latest,
        skipped,
        history[-1][1] if history else {},
    )


def train_loop(
    spec: RunSpec, session: Session, run_id: str | None = None, tracker: Tracker | None = None
) -> TrainSummary:
    """Train (or resume) the run ``spec`` in this worker; returns a summary. Rank 0 logs to ``tracker``."""
    training = build_training(spec, session, run_id)
    tracker = NullTracker() if tracker is None else tracker
    return run_loop(training, spec.config.train, spec.config.eval, session, tracker)
