"""``model.pretrained`` from object storage (a real S3 server, SeaweedFS) and from torchvision's files in
torch's cache; offline, a missing torchvision file is one line saying so."""

from __future__ import annotations

import re
import urllib.error
from pathlib import Path
from typing import Any

import pytest
import torch

from ccnet.backbone_base import PretrainedWeightsError
from ccnet.backbones import build_backbone
from pipeline.config import load_config
from pipeline.config.model import build_model
from pipeline.io import storage


def _tiny_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return build_backbone("tiny").state_dict()


@pytest.mark.integration
def test_pretrained_weights_from_s3(s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCNET_CACHE", str(tmp_path / "cache"))
    weights = _tiny_weights()
    local = tmp_path / "tiny.pt"
    torch.save(weights, local)
    uri = storage.join(s3_env, "weights", "tiny.pt")
    storage.ensure_bucket(uri)
    storage.write_bytes(uri, local.read_bytes())
    config = load_config(None, ["model.name=ccnet_tiny", f"model.pretrained={uri}"])
    for _ in range(2):  # the second build reads the cached copy
        model: Any = build_model(config, num_classes=3)
        for key, value in weights.items():
            assert torch.equal(model.backbone.state_dict()[key], value), key
    assert len(list((tmp_path / "cache").rglob("tiny.pt"))) == 1
    missing = load_config(None, ["model.name=ccnet_tiny", f"model.pretrained={s3_env}/weights/nope.pt"])
    with pytest.raises(FileNotFoundError, match="model.pretrained: s3://.*/weights/nope.pt does not exist"):
        build_model(missing, num_classes=3)


def test_torchvision_weights_from_torchs_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    reference = torchvision.models.resnet50().state_dict()
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(reference, tmp_path / "hub" / "checkpoints" / Path(url).name)

    def offline(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached file is not downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    config = load_config(None, ["model.name=ccnet_r50_d8", "model.pretrained=torchvision:IMAGENET1K_V2"])
    assert config.with_absolute_paths().model.pretrained == "torchvision:IMAGENET1K_V2"  # not a path
    model: Any = build_model(config, num_classes=3)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items() if k in loaded)
    assert torch.equal(loaded["conv1.weight"], reference["conv1.weight"])


def test_torchvision_weights_refused_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    cases = {
        (
            "resnet101",
            "torchvision:IMAGENET1K_V2",
        ): "is not in torch's cache and https://download.pytorch.org/",
        ("resnet50", "torchvision:IMAGENET9K"): "ResNet50_Weights has no 'IMAGENET9K'; choose one of",
        ("resnet101_deepstem", "torchvision:IMAGENET1K_V1"): "fit the backbones ['resnet101', 'resnet50']",
        ("efficientnet_lite0", "torchvision:IMAGENET1K_V1"): "not 'efficientnet_lite0'",
    }
    for (name, spec), message in cases.items():
        with pytest.raises(PretrainedWeightsError, match=re.escape(message)) as error:
            build_backbone(name, pretrained=spec)
        assert "\n" not in str(error.value)
    assert "offline?" in str(
        pytest.raises(
            PretrainedWeightsError, build_backbone, "resnet50", pretrained="torchvision:IMAGENET1K_V1"
        ).value
    )
