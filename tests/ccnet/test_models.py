"""CCNet models: output contract, variants, registry and config errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ccnet import CCNet, CrissCrossAttention, NonLocal2d, build_ccnet, list_models, model_config
from ccnet.attention import AxialAttention, RecurrentAttention

TINY_VARIANTS = {
    "ccnet": {},
    "ccnet_r1": {"recurrence": 1},
    "ccnet_r3": {"recurrence": 3},
    "fcn_r0": {"recurrence": 0},
    "nonlocal": {"attention": "nonlocal", "recurrence": 1},
    "axial": {"attention": "axial", "recurrence": 1},
    "stem_only": {"placement": "stem"},
    "stem_and_head": {"placement": "both"},
    "no_aux": {"aux_channels": 0},
    "embedding": {"embedding_channels": 16},
}


@pytest.mark.parametrize("variant", TINY_VARIANTS)
def test_tiny_variants_output_contract_and_gradients(variant: str) -> None:
    torch.manual_seed(0)
    model = build_ccnet("ccnet_tiny", num_classes=5, **TINY_VARIANTS[variant])
    for module in model.modules():  # gamma starts at 0: give attention a say so its params get gradients
        if hasattr(module, "gamma"):
            torch.nn.init.constant_(module.gamma, 0.5)
    image = torch.randn(2, 3, 45, 61)  # non-square, not a multiple of 8
    outputs = model(image)
    assert outputs["out"].shape == (2, 5, 45, 61)
    assert ("aux" in outputs) == (model.config.aux_channels > 0)
    if "aux" in outputs:
        assert outputs["aux"].shape == (2, 5, 45, 61)
    if model.config.embedding_channels:
        assert outputs["embedding"].shape == (2, 16, 6, 8)
    sum(o.sum() for o in outputs.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_variants_build_the_right_modules() -> None:
    def attention(model: CCNet) -> torch.nn.Module:
        return model.head.attention

    ccnet = build_ccnet("ccnet_tiny", 3)
    assert isinstance(attention(ccnet), RecurrentAttention) and attention(ccnet).recurrence == 2
    assert isinstance(attention(ccnet).attention, CrissCrossAttention)
    assert isinstance(attention(build_ccnet("nonlocal_tiny", 3)).attention, NonLocal2d)
    assert isinstance(attention(build_ccnet("axial_tiny", 3)).attention, AxialAttention)
    assert isinstance(attention(build_ccnet("fcn_tiny", 3)), torch.nn.Identity)
    stem_only = build_ccnet("ccnet_tiny", 3, placement="stem")
    assert isinstance(attention(stem_only), torch.nn.Identity)
    assert stem_only.stem_attention.attention.in_channels == stem_only.backbone.stem_channels
    assert ccnet.stem_attention is None


def test_stem_attention_runs_at_stride_four() -> None:
    model = build_ccnet("ccnet_tiny", 3, placement="stem").eval()
    seen = []
    model.stem_attention.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape))
    model(torch.randn(1, 3, 64, 96))
    assert seen == [torch.Size([1, model.backbone.stem_channels, 16, 24])]


@pytest.mark.parametrize("placement", ["stem", "both"])
def test_stem_attention_feeds_the_first_deep_stage(placement: str) -> None:
    torch.manual_seed(0)
    model = build_ccnet("ccnet_tiny", 4, placement=placement).eval()
    stage_one = []
    model.backbone.layer1.register_forward_hook(lambda _m, _i, output: stage_one.append(output))
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        model.backbone(image)  # no stem hook: the stage-1 features without any attention
        model(image)  # gamma = 0: the stem attention is the identity
        model.stem_attention.attention.gamma.fill_(1.0)
        model(image)
    plain, gamma_zero, gamma_one = stage_one
    torch.testing.assert_close(gamma_zero, plain, atol=0, rtol=0)
    assert (gamma_one - plain).abs().max() > 1e-3 * plain.abs().max()


def test_head_placement_has_no_stem_attention() -> None:
    model = build_ccnet("ccnet_tiny", 4, placement="head")
    assert model.stem_attention is None
    recurrent = [name for name, module in model.named_modules() if isinstance(module, RecurrentAttention)]
    assert recurrent == ["head.attention"]


def test_registry_names_are_self_describing() -> None:
    names = list_models()
    assert "ccnet_r101_deepstem_d8" in names and "ccnet_tiny" in names
    for method in ("ccnet", "nonlocal", "axial", "fcn"):
        for backbone in ("r50_d8", "r101_d8", "r101_deepstem_d8", "tiny"):
            assert f"{method}_{backbone}" in names
    reference = model_config("ccnet_r101_deepstem_d8")
    assert reference.backbone == "resnet101_deepstem"
    assert (reference.recurrence, reference.head_channels) == (2, 512)
    assert (reference.reduction, reference.dropout, reference.output_stride) == (8, 0.1, 8)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_keeps_the_contract(name: str) -> None:
    """Built on the meta device (shapes only): logits and aux logits at the input size, the input
    normalisation its backbone expects, and the options it was registered with."""
    config = model_config(name)
    with torch.device("meta"):
        model = build_ccnet(name, num_classes=7)
        outputs = model(torch.empty(2, 3, 65, 97))
    assert isinstance(model, CCNet) and model.config == dataclasses.replace(config, num_classes=7)
    assert outputs["out"].shape == (2, 7, 65, 97)
    assert ("aux" in outputs) == (config.aux_channels > 0)
    if "aux" in outputs:
        assert outputs["aux"].shape == (2, 7, 65, 97)
    assert len(model.normalization.mean) == len(model.normalization.std) == 3


def test_reference_model_structure_on_meta() -> None:
    with torch.device("meta"):
        model = build_ccnet("ccnet_r101_deepstem_d8", num_classes=19)
        outputs = model(torch.empty(1, 3, 769, 769))
    assert outputs["out"].shape == (1, 19, 769, 769) and outputs["aux"].shape == (1, 19, 769, 769)
    head = model.head
    assert head.reduce[0].in_channels == 2048 and head.reduce[0].out_channels == 512
    assert head.reduce[0].kernel_size == (3, 3) and head.project[0].kernel_size == (3, 3)
    assert head.bottleneck[0].in_channels == 2048 + 512 and head.bottleneck[0].out_channels == 512
    assert head.dropout.p == 0.1 and head.classifier.kernel_size == (1, 1)
    attention = head.attention.attention
    assert attention.query.out_channels == 64 and attention.value.out_channels == 512
    assert model.aux_head[0][0].in_channels == 1024


@pytest.mark.parametrize("name", ["ccnet_lite0_d16", "fcn_lite2_d8", "axial_lite1_d16"])
def test_efficientnet_lite_models_train_on_cpu(name: str) -> None:
    method, variant, stride = name.split("_")
    config = model_config(name)
    assert config.backbone == f"efficientnet_{variant}" and config.output_stride == int(stride[1:])
    assert config.recurrence == {"ccnet": 2, "fcn": 0, "axial": 1}[method]
    model = build_ccnet(name, num_classes=5)
    assert model.normalization.mean == (0.5, 0.5, 0.5)  # the TF Lite weights' [-1, 1] inputs
    outputs = model(torch.randn(2, 3, 48, 64))
    assert outputs["out"].shape == (2, 5, 48, 64) and outputs["aux"].shape == (2, 5, 48, 64)
    (outputs["out"].mean() + outputs["aux"].mean()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "gamma" not in n)


@pytest.mark.parametrize("name", ["ccnet_r50_d8", "ccnet_r101_d8", "ccnet_r101_deepstem_d8"])
def test_resnet_models_forward_on_cpu(name: str) -> None:
    model = build_ccnet(name, num_classes=4, head_channels=64, bottleneck_channels=64, aux_channels=32).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 33, 41))
    assert outputs["out"].shape == (1, 4, 33, 41) and torch.isfinite(outputs["out"]).all()


@pytest.mark.parametrize("align_corners", [False, True])
def test_logits_are_upsampled_with_the_configured_align_corners(align_corners: bool) -> None:
    torch.manual_seed(0)
    model = build_ccnet("ccnet_tiny", num_classes=3, align_corners=align_corners).eval()
    image = torch.randn(1, 3, 33, 41)  # 8k + 1 pixels each way, the geometry of the 769 crops
    with torch.no_grad():
        features = model.backbone(image, stem_hook=model.stem_attention)
        low = {"out": model.head(features["out"])["out"], "aux": model.aux_head(features["aux"])}
        outputs = model(image)
    for name, logits in low.items():
        assert logits.shape[-2:] != (33, 41)
        expected = F.interpolate(logits, size=(33, 41), mode="bilinear", align_corners=align_corners)
        other = F.interpolate(logits, size=(33, 41), mode="bilinear", align_corners=not align_corners)
        torch.testing.assert_close(outputs[name], expected, atol=1e-6, rtol=0)
        assert (outputs[name] - other).abs().max() > 1e-3, "the two settings must be told apart"


def test_align_corners_defaults_to_false_for_saved_checkpoints() -> None:
    # Every checkpoint saved before the option was trained with False; recipes set True (769x769 configs).
    assert all(not model_config(name).align_corners for name in list_models())


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="unknown model 'ccnet_r18'"):
        build_ccnet("ccnet_r18", 3)
    with pytest.raises(TypeError, match=r"unknown option\(s\) for model 'ccnet_tiny': \['recurrance'\]"):
        build_ccnet("ccnet_tiny", 3, recurrance=2)
    with pytest.raises(ValueError, match="recurrence=-1"):
        build_ccnet("ccnet_tiny", 3, recurrence=-1)
    with pytest.raises(ValueError, match="attention='dense'"):
        build_ccnet("ccnet_tiny", 3, attention="dense")
    with pytest.raises(ValueError, match="placement='neck'"):
        build_ccnet("ccnet_tiny", 3, placement="neck")
    with pytest.raises(ValueError, match="num_classes=0"):
        build_ccnet("ccnet_tiny", 0)


def test_ccnet_imports_no_pipeline_dependencies() -> None:
    code = (
        "import sys, ccnet, ccnet.attention, ccnet.attention_maps, ccnet.backbones, ccnet.heads, "
        "ccnet.inference, ccnet.losses, ccnet.metrics, ccnet.models, ccnet.profiling, ccnet.export\n"
        "bad = [m for m in ('ray', 'mlflow', 'boto3', 'pyarrow', 'pipeline') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("attention", ["criss_cross", "axial", "nonlocal"])
def test_gamma_init_sets_every_attention_and_lets_its_weights_learn_at_once(attention: str) -> None:
    """At gamma 0 (the paper's start) the query/key/value convs get no gradient; at gamma_init 0.5 they do."""
    image = torch.randn(1, 3, 64, 64)
    gradients = {}
    for gamma_init in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_ccnet(
            "ccnet_tiny",
            num_classes=3,
            attention=attention,
            placement="both",
            recurrence=1,
            gamma_init=gamma_init,
            impl="autograd",
        )
        gammas = [module.gamma.item() for module in model.modules() if hasattr(module, "gamma")]
        assert gammas == [gamma_init, gamma_init]  # stem and head
        model(image)["out"].square().mean().backward()
        gradients[gamma_init] = model.head.attention.attention.query.weight.grad.abs().sum().item()
    assert gradients[0.0] == 0.0 and gradients[0.5] > 0.0


def test_gamma_init_must_be_finite() -> None:
    with pytest.raises(ValueError, match="gamma_init=nan"):
        model_config("ccnet_tiny", gamma_init=float("nan"))
