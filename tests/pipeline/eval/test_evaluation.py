"""pipeline.eval.evaluation against hand-computed confusion matrices, over ranks, protocols and a real gloo
group.

The fake model predicts, at each pixel, the index of the largest of its three input channels (class 3,
"sky", never wins), so a test writes the predictions it wants into the image.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from ccnet.models import build_ccnet
from pipeline.config import EvalConfig
from pipeline.eval.evaluation import EvalProtocol, evaluate, evaluate_protocols
from pipeline.eval.results import EvalResult, protocol_table, summary_metrics

CLASSES = ("road", "car", "traffic light", "sky")
IGNORE = 255

PRED_1 = [[0, 0, 1], [1, 2, 2]]
LABEL_1 = [[0, 1, 1], [IGNORE, 2, 0]]
PRED_2 = [[2, 2], [0, 1]]
LABEL_2 = [[2, IGNORE], [0, 0]]

# (ground truth, prediction) pairs, ignore pixels dropped:
#   image 1: (0,0) (1,0) (1,1) (2,2) (0,2)     image 2: (2,2) (0,0) (0,1)
CONFUSION_1 = [[1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
CONFUSION_2 = [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
CONFUSION = [[2, 1, 1, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
# IoU = TP / (row + column - TP): road 2 / (4 + 3 - 2), car 1 / (2 + 2 - 1), traffic light 2 / (2 + 3 - 2);
# sky is absent from both, so NaN and left out of the mean.
IOU = {"road": 2 / 5, "car": 1 / 3, "traffic light": 2 / 3}
MIOU = (2 / 5 + 1 / 3 + 2 / 3) / 3  # 0.4667
PIXEL_ACCURACY = 5 / 8  # diagonal 2 + 1 + 2 over 8 labelled pixels (5 + 3)
MEAN_ACCURACY = (2 / 4 + 1 / 2 + 2 / 2) / 3


class ChannelArgmax(nn.Module):
    """Per pixel (a fixed 1x1 map): logits 10 * the input channels, and -100 for class 3. Records, per
    forward, (training flag, input shape, autocast on)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[bool, tuple[int, ...], bool]] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        self.calls.append((self.training, tuple(x.shape), torch.is_autocast_enabled("cpu")))
        logits = torch.cat([10 * x, torch.full_like(x[:, :1], -100.0)], dim=1)  # (B, 3, H, W) -> (B, 4, H, W)
        return {"out": logits, "aux": logits}


def one_hot_image(pred: list[list[int]] | np.ndarray) -> Tensor:
    """(3, H, W): +1 on channel pred[y][x], -1 elsewhere, so ChannelArgmax predicts ``pred``."""
    pred = torch.as_tensor(pred)
    return torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).float() * 2 - 1  # (H, W, 3) -> (3, H, W)


def hand_dataset() -> list[dict[str, object]]:
    return [
        {"image": one_hot_image(PRED_1), "label": torch.tensor(LABEL_1), "sample_id": "a"},
        {"image": one_hot_image(PRED_2), "label": torch.tensor(LABEL_2), "sample_id": "b"},
    ]


def run(model: nn.Module, dataset: list[dict[str, object]], **kwargs: Any) -> EvalResult:
    """:func:`evaluate` with the protocol's fields among ``kwargs`` (``mode``, ``scales``, ...)."""
    fields = {f.name for f in dataclasses.fields(EvalProtocol)}
    protocol = EvalProtocol(**{k: tuple(v) if k == "scales" else v for k, v in kwargs.items() if k in fields})
    others = {k: v for k, v in kwargs.items() if k not in fields}
    return evaluate(model, dataset, protocol, num_classes=4, class_names=CLASSES, progress=False, **others)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_hand_computed_confusion_and_metrics(mode: str) -> None:
    result = run(ChannelArgmax(), hand_dataset(), mode=mode, crop_size=2, stride=1)
    assert result.confusion.tolist() == CONFUSION
    assert result.confusion.dtype == torch.int64
    assert result.num_images == 2
    assert result.miou == pytest.approx(MIOU)
    assert result.pixel_accuracy == pytest.approx(PIXEL_ACCURACY)
    assert result.mean_accuracy == pytest.approx(MEAN_ACCURACY)
    iou = result.iou
    assert {name: iou[name] for name in IOU} == pytest.approx(IOU)
    assert math.isnan(iou["sky"])


def test_metrics_for_tracking_and_table() -> None:
    result = EvalResult(torch.tensor(CONFUSION), CLASSES)
    metrics = result.as_metrics("val")
    assert metrics["val/mIoU"] == pytest.approx(MIOU)
    assert metrics["val/pixel_accuracy"] == pytest.approx(PIXEL_ACCURACY)
    assert metrics["val/IoU/traffic_light"] == pytest.approx(2 / 3)
    assert math.isnan(metrics["val/IoU/sky"])
    assert all(" " not in key for key in metrics)
    table = result.table()
    assert "| traffic light | 66.67 |" in table
    assert "| sky | n/a |" in table
    assert "46.67" in table


def test_max_images_counts_only_the_first() -> None:
    result = run(ChannelArgmax(), hand_dataset(), max_images=1)
    assert result.confusion.tolist() == CONFUSION_1
    assert result.num_images == 1


def test_ranks_without_a_process_group_split_the_images() -> None:
    parts = [run(ChannelArgmax(), hand_dataset(), rank=rank, world_size=2) for rank in (0, 1)]
    assert parts[0].confusion.tolist() == CONFUSION_1
    assert parts[1].confusion.tolist() == CONFUSION_2
    assert (parts[0].confusion + parts[1].confusion).tolist() == CONFUSION
    # max_images applies before the split: rank 1 gets nothing.
    assert run(ChannelArgmax(), hand_dataset(), max_images=1, rank=1, world_size=2).confusion.sum() == 0


def _gloo_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        result = run(ChannelArgmax(), hand_dataset(), rank=rank, world_size=world_size)
        torch.save({"confusion": result.confusion, "num_images": result.num_images}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~8 s on 2 cores
def test_gloo_ranks_all_return_the_global_confusion(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.spawn(_gloo_worker, args=(2, port, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "gloo workers did not finish in 120 s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"{rank}.pt")
        assert saved["confusion"].tolist() == CONFUSION
        assert saved["num_images"] == 2


def block_dataset() -> list[dict[str, object]]:
    """One 12x16 image of 4x4 blocks of predicted classes (asymmetric, so a missed un-flip shows)."""
    blocks = np.array([[0, 1, 2, 2], [1, 1, 0, 2], [2, 0, 0, 1]])
    pred = blocks.repeat(4, axis=0).repeat(4, axis=1)  # (3, 4) -> (12, 16)
    label = np.roll(pred, 1, axis=1)  # off by one column: some pixels right, some wrong
    label[0, :5] = IGNORE
    return [{"image": one_hot_image(pred), "label": torch.from_numpy(label).long(), "sample_id": "blocks"}]


def numpy_confusion(pred: np.ndarray, label: np.ndarray, num_classes: int = 4) -> list[list[int]]:
    valid = label != IGNORE
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (label[valid], pred[valid]), 1)
    return counts.tolist()


def test_multiscale_flip_of_a_per_pixel_model_equals_single_scale() -> None:
    dataset = block_dataset()
    (item,) = dataset
    expected = numpy_confusion(item["image"].argmax(0).numpy(), item["label"].numpy())
    single = run(ChannelArgmax(), dataset)
    model = ChannelArgmax()
    multi = run(model, dataset, scales=(0.5, 1.0, 2.0), flip=True)
    assert single.confusion.tolist() == expected
    assert multi.confusion.tolist() == expected
    # It really ran three scales, each also flipped.
    assert sorted(shape[-2:] for _, shape, _ in model.calls) == [(6, 8)] * 2 + [(12, 16)] * 2 + [(24, 32)] * 2


def test_protocols_and_their_table() -> None:
    config = EvalConfig(mode="whole", scales=[1.0, 2.0], flip=True)
    model = ChannelArgmax()
    results = evaluate_protocols(
        model, hand_dataset(), eval_config=config, num_classes=4, class_names=CLASSES, progress=False
    )
    assert list(results) == ["single-scale", "multi-scale+flip"]
    assert results["single-scale"].scales == (1.0,) and not results["single-scale"].flip
    assert results["multi-scale+flip"].scales == (1.0, 2.0) and results["multi-scale+flip"].flip
    for result in results.values():
        assert result.confusion.tolist() == CONFUSION
    # 2 images single-scale, then 2 images x 2 scales x 2 flips.
    assert len(model.calls) == 2 + 8
    table = protocol_table(results)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("|")}
    assert "46.67" in rows["single-scale"] and "46.67" in rows["multi-scale+flip"]
    assert "66.67" in rows["traffic light"]


def test_protocols_reuse_a_known_single_scale_result_and_the_summary_names_each_figure_once(
    tmp_path: Path,
) -> None:
    config = EvalConfig(mode="whole", scales=[1.0, 2.0], flip=True)
    torch.save(EvalResult(torch.tensor(CONFUSION), CLASSES, num_images=2).state(), tmp_path / "state.pt")
    restored = EvalResult.from_state(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.confusion.tolist() == CONFUSION and restored.class_names == CLASSES
    assert (restored.scales, restored.flip, restored.num_images) == ((1.0,), False, 2)
    model = ChannelArgmax()
    results = evaluate_protocols(
        model,
        hand_dataset(),
        eval_config=config,
        num_classes=4,
        class_names=CLASSES,
        progress=False,
        single_scale=restored,
    )
    assert results["single-scale"] is restored
    assert len(model.calls) == 8  # only the multi-scale + flip pass ran: 2 images x 2 scales x 2 flips
    metrics = summary_metrics(results)
    assert metrics["final/mIoU_ss"] == pytest.approx(MIOU) == metrics["final/mIoU_ms_flip"]
    assert metrics["final/pixel_accuracy_ms_flip"] == pytest.approx(PIXEL_ACCURACY)
    assert metrics["final/IoU_ss/traffic_light"] == pytest.approx(2 / 3)
    assert math.isnan(metrics["final/IoU_ms_flip/sky"])
    # per protocol: mIoU, pixel and mean accuracy, 4 classes; nothing else, no name twice
    assert len(metrics) == 2 * (3 + 4)
    assert not any("single-scale" in key or "+" in key for key in metrics)


@pytest.mark.parametrize("fusion", ["logits", "probs"])
def test_protocols_predict_with_the_configured_fusion(monkeypatch: pytest.MonkeyPatch, fusion: str) -> None:
    import pipeline.eval.evaluation

    seen: list[str] = []
    real = pipeline.eval.evaluation.predict_multiscale

    def spy(*args: object, **kwargs: object) -> Tensor:
        seen.append(kwargs["fusion"])
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline.eval.evaluation, "predict_multiscale", spy)
    config = EvalConfig(mode="whole", scales=[1.0, 2.0], flip=True, fusion=fusion)
    results = evaluate_protocols(
        ChannelArgmax(),
        hand_dataset(),
        eval_config=config,
        num_classes=4,
        class_names=CLASSES,
        progress=False,
    )
    assert seen == [fusion] * 4  # 2 images x 2 protocols
    assert all(result.fusion == fusion for result in results.values())
    assert EvalConfig().fusion == "logits"  # the authors' by default


def test_training_mode_is_restored_and_the_forward_runs_in_eval_mode() -> None:
    model = ChannelArgmax().train()
    run(model, hand_dataset())
    assert model.training
    assert model.calls and not any(training for training, _, _ in model.calls)
    model.eval()
    run(model, hand_dataset())
    assert not model.training


def test_training_mode_is_restored_when_prediction_fails() -> None:
    model = ChannelArgmax().train()
    broken = hand_dataset()
    broken[1]["label"] = torch.zeros(5, 5, dtype=torch.int64)  # wrong size: the metric refuses it
    with pytest.raises(ValueError, match="shapes differ"):
        run(model, broken)
    assert model.training


def test_amp_dtype_turns_autocast_on() -> None:
    model = ChannelArgmax()
    run(model, hand_dataset())
    run(model, hand_dataset(), amp_dtype=torch.bfloat16)
    assert [autocast for _, _, autocast in model.calls] == [False, False, True, True]


def test_ccnet_tiny_on_images_of_different_sizes() -> None:
    torch.manual_seed(0)
    model = build_ccnet("ccnet_tiny", num_classes=3)
    dataset = []
    for height, width in ((32, 32), (40, 48), (40, 48)):
        label = torch.randint(0, 3, (height, width))
        label[:4] = IGNORE
        dataset.append({"image": torch.randn(3, height, width), "label": label, "sample_id": f"{height}"})
    result = evaluate(
        model,
        dataset,
        EvalProtocol(mode="slide", crop_size=32, stride=24),
        num_classes=3,
        batch_size=2,
        progress=False,
    )
    assert result.num_images == 3
    assert result.num_pixels == sum(int((item["label"] != IGNORE).sum()) for item in dataset)
    assert result.class_names == ("class_0", "class_1", "class_2")
