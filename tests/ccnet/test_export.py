"""ONNX export (:mod:`ccnet.export`): every attention, placement and R exports with a dynamic batch, height
and width, and onnxruntime predicts what PyTorch predicts, on real CamVid frames too."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ccnet import build_ccnet
from ccnet.export import OnnxSegmenter, export_onnx
from pipeline.eval.onnx import parity

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.slow
CAMVID = (Path(__file__).parents[2] / ".." / "shared" / "data" / "camvid").resolve()

VARIANTS = [
    ("fcn_tiny", {}),
    ("ccnet_tiny", {"recurrence": 1}),
    ("ccnet_tiny", {}),  # R=2, the head
    ("ccnet_tiny", {"recurrence": 3, "placement": "both"}),
    ("axial_tiny", {"placement": "stem"}),
    ("nonlocal_tiny", {"placement": "both"}),
    ("ccnet_tiny", {"output_stride": 16, "align_corners": True}),
]


@pytest.mark.parametrize(("name", "overrides"), VARIANTS, ids=lambda v: str(v))
def test_every_variant_exports_with_dynamic_sizes(name: str, overrides: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_ccnet(name, 5, gamma_init=0.5, **overrides)  # gamma 0.5: the attention counts
    for module in model.modules():  # running statistics that are not the identity's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    model.train()
    path = export_onnx(model, tmp_path / "model.onnx", metadata={"ccnet.model": name})
    assert model.training  # its mode restored
    segmenter = OnnxSegmenter(path)
    assert segmenter.metadata == {"ccnet.model": name} and segmenter.num_classes == 5
    images = [torch.randn(*shape) for shape in ((1, 3, 96, 128), (2, 3, 77, 101), (1, 3, 200, 150))]
    report = parity(model.eval(), segmenter, images=images)
    assert report.max_logit_difference < 1e-4 and report.argmax_agreement >= 0.999, report


@pytest.mark.skipif(not CAMVID.is_dir(), reason=f"no CamVid copy at {CAMVID}")
def test_camvid_frames_predict_the_same_with_onnxruntime(tmp_path: Path) -> None:
    """The CamVid model (EfficientNet-Lite0 ImageNet weights, R=2 head at stride 16) on three real frames
    at three sizes, one whose sides are not multiples of the stride: logits within fp32 tolerance and
    argmax masks agreeing on >= 99.9 % of pixels."""
    from ccnet.backbone_base import SYMMETRIC_NORMALIZATION
    from ccnet.efficientnet import imagenet_weights

    torch.manual_seed(0)
    model = build_ccnet(
        "ccnet_lite0_d16", 11, gamma_init=0.5, pretrained=str(imagenet_weights("lite0"))
    ).eval()
    segmenter = OnnxSegmenter(export_onnx(model, tmp_path / "camvid.onnx"))
    frames = sorted((CAMVID / "val").glob("*.png"))[:3]
    mean = torch.tensor(SYMMETRIC_NORMALIZATION.mean).view(1, 3, 1, 1)
    std = torch.tensor(SYMMETRIC_NORMALIZATION.std).view(1, 3, 1, 1)
    images = []
    for frame, size in zip(frames, ((360, 480), (256, 320), (203, 271)), strict=True):
        rgb = np.asarray(Image.open(frame).convert("RGB").resize(size[::-1], Image.BILINEAR))
        images.append((torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255 - mean) / std)
    report = parity(model, segmenter, images=images)
    assert report.max_logit_difference < 1e-3 and report.argmax_agreement >= 0.999, report
