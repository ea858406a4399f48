"""Config loading: defaults, YAML overrides, --set, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, ModelConfig, config_from_dict, dump_config, load_config


def test_defaults_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model: {name: ccnet_r50_d8, recurrence: 1}\ntrain: {lr: 1, iterations: 50}\n")
    config = load_config(path, ["train.lr=0.02", "eval.scales=[1.0, 1.5]", "tracking.uri=sqlite:///x.db"])
    assert load_config(path, ["train.lr=1e-3"]).train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string
    assert config.model.name == "ccnet_r50_d8" and config.model.overrides() == {"recurrence": 1}
    assert config.train.lr == 0.02 and isinstance(load_config(path).train.lr, float)  # int 1 -> 1.0
    assert config.eval.scales == [1.0, 1.5] and config.train.iterations == 50
    assert config.flat()["train.lr"] == 0.02 and config.flat()["model.name"] == "ccnet_r50_d8"
    assert config_from_dict(yaml.safe_load(dump_config(config))) == config


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("train: {lrate: 0.1}\n", [], r"run.yaml: unknown key train.lrate"),
        ("trainer: {lr: 0.1}\n", [], r"run.yaml: unknown key trainer"),
        ("train: {lr: fast}\n", [], r"run.yaml: train.lr must be float, got 'fast'"),
        ("train: {iterations: 1.5}\n", [], r"train.iterations must be int, got 1.5"),
        ("train: {ohem: 3}\n", [], r"train.ohem must be bool, got 3"),
        ("", ["train.lr=-0.1"], r"train.lr=-0.1 is not allowed"),
        ("", ["model.recurrence=-1"], r"model.recurrence=-1 is not allowed"),
        ("", ["train.amp=O3"], r"train.amp='O3' is not allowed"),
        ("", ["eval.stride=1000"], r"eval.stride=1000 is not allowed"),
        ("", ["eval.fusion=votes"], r"eval.fusion='votes' is not allowed"),
        ("", ["train.ohem_min_kept=-1"], r"train.ohem_min_kept=-1 is not allowed"),
        ("", ["train.consistency_weight=-1"], r"train.consistency_weight=-1.0 is not allowed"),
        ("", ["model.embedding_channels=-8"], r"model.embedding_channels=-8 is not allowed"),
        (
            "",
            ["model.impl=lean", "model.attention=axial"],
            r"model.impl='lean' with attention='axial' is not allowed; choose one of \['auto', 'triton', ",
        ),
        (
            "",
            ["model.impl=triton", "model.attention=nonlocal"],
            r"model.impl='triton' with attention='nonlocal'",
        ),
        (
            "model: {fused: 3}\n",
            [],
            r"run.yaml: model.fused is now model.impl \(auto, triton, lean or autograd\)",
        ),
        ("", ["train.consistency_weight=1"], r"consistency_weight=1.0 needs model.embedding_channels > 0"),
        ("", ["train.consistency_weight=1", "model.embedding_channels=0"], r"needs model.embedding_channels"),
        ("", ["lr=0.1"], r"expected section.key=value, got 'lr=0.1'"),
        ("train: [1, 2]\n", [], r"train must be a mapping"),
        ("train: {lr: [0.1\n", [], r"run.yaml: invalid YAML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="nowhere.yaml: config file not found"):
        load_config("nowhere.yaml")


CONFIGS = Path(__file__).parents[2].joinpath("configs")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")))
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*769x769*.yaml")))
def test_769_recipes_follow_the_authors(path: Path) -> None:
    from ccnet import model_config

    config = load_config(path)
    resolved = model_config(config.model.name, **config.model.overrides())
    assert resolved.align_corners is True
    assert config.eval.fusion == "logits"
    assert config.train.ohem and config.train.ohem_min_kept == 100_000 // 2  # per image


# The paper's recipes (Cityscapes, ADE20K, COCO-Stuff, and the CamVid R50 one that follows them): one SGD
# group at lr with weight decay on every parameter, gamma from 0.
PAPER_RECIPES = sorted(CONFIGS.glob("ccnet_r*.yaml"))


@pytest.mark.parametrize("path", PAPER_RECIPES, ids=[p.stem for p in PAPER_RECIPES])
def test_paper_recipes_keep_the_reference_optimiser_and_gamma(path: Path) -> None:
    from ccnet import model_config

    config = load_config(path)
    assert config.train.head_lr_mult == 1.0 and config.train.no_decay_1d is False
    assert model_config(config.model.name, **config.model.overrides()).gamma_init == 0.0


def test_paper_defaults() -> None:
    config = load_config(None)
    assert config.eval.fusion == "logits" and config.train.ohem_min_kept == 50_000
    assert config.train.consistency_weight == 0.0 and config.model.overrides() == {}
    assert config.train.head_lr_mult == 1.0 and config.train.no_decay_1d is False


def test_model_options_reach_the_model_config() -> None:
    config = load_config(
        None, ["model.align_corners=true", "model.embedding_channels=16", "train.consistency_weight=0.5"]
    )
    assert config.model.overrides() == {"align_corners": True, "embedding_channels": 16}


@pytest.mark.parametrize(("fused", "impl"), [("null", "auto"), ("true", "triton"), ("false", "lean")])
def test_configs_of_older_checkpoints_map_model_fused_to_impl(fused: str, impl: str, tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {{fused: {fused}}}\n")
    assert load_config(path, []).model.impl == impl


@pytest.mark.parametrize("value", ["none", "None"])
def test_pretrained_none_means_no_weights(value: str) -> None:
    config = load_config(None, [f"model.pretrained={value}"]).with_absolute_paths()
    assert config.model.pretrained == value  # kept as written: it silences the missing-weights warning
    assert "pretrained" not in config.model.overrides()
    assert load_config(None, ["model.pretrained=w.pth"]).model.overrides()["pretrained"] == "w.pth"


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("run.storage=s3://", "defaults: run.storage='s3://' has no bucket"),
        ("data.uri=gs://bucket/v1", "defaults: data.uri='gs://bucket/v1' has an unsupported scheme 'gs'"),
        ("data.uri=file://host/v1", "defaults: data.uri='file://host/v1' names host 'host'"),
    ],
)
def test_locations_are_parsed_by_validation(setting: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(None, [setting])
    assert str(error.value).startswith(expected)  # itself, not wrapped in another key's message


def test_with_absolute_paths_resolves_locations_and_logs_relative_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    caplog.set_level("INFO", logger="pipeline.config")
    config = load_config(None, ["data.uri=data/v1", f"run.storage={(tmp_path / 'a b').as_uri()}"])
    resolved = config.with_absolute_paths()
    assert resolved.data.uri == str(tmp_path / "data/v1") and resolved.run.storage == str(tmp_path / "a b")
    assert caplog.messages == [f"data.uri: data/v1 resolved to {tmp_path / 'data/v1'}"]
    caplog.clear()
    assert resolved.with_absolute_paths() == resolved and caplog.messages == []
    s3 = load_config(None, ["run.storage=s3://bucket/runs"]).with_absolute_paths()
    assert s3.run.storage == "s3://bucket/runs"


def test_every_model_option_is_a_field_of_the_model_config() -> None:
    """``model.*`` keys override the CCNetConfig field of their name: one source of truth for the options."""
    from ccnet.models import CCNetConfig

    options = set(ModelConfig().overrides()) | {
        f.name for f in dataclasses.fields(ModelConfig) if f.name not in ("name", "sync_bn")
    }
    assert options <= {f.name for f in dataclasses.fields(CCNetConfig)}
    assert load_config(None, ["model.recurrence=1", "model.attention=axial"]).model.overrides() == {
        "recurrence": 1,
        "attention": "axial",
    }
