"""A sweep of every config key with nonsense values (negative, zero, NaN, infinite, unknown names): each is
refused at load time with one line naming the key and what it expects, so nothing starts. A guard test keeps
the sweep complete: a key added to the config without a case here fails it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli.main import main
from pipeline.config import Config, ConfigError, load_config

ROOT = Path(__file__).parents[2]

# key: [(value as --set writes it, text the error holds), ...]
NONSENSE: dict[str, list[tuple[str, str]]] = {
    "model.name": [("ccnet_r1000", "model.name='ccnet_r1000' is not a registered model")],
    "model.recurrence": [("-1", "model.recurrence=-1 is not allowed")],
    "model.attention": [("dense", "model.attention='dense' is not allowed; choose one of")],
    "model.placement": [("tail", "model.placement='tail' is not allowed; choose one of")],
    "model.output_stride": [("4", "model.output_stride=4 is not allowed"), ("0", "output_stride=0")],
    "model.embedding_channels": [("-8", "model.embedding_channels=-8 is not allowed")],
    "model.gamma_init": [(".nan", "model.gamma_init=nan is not allowed"), (".inf", "model.gamma_init=inf")],
    "model.impl": [("fast", "model.impl='fast' is not allowed; choose one of ['auto', 'triton', 'lean'")],
    "data.train_split": [("''", "data.train_split='' is not allowed"), ("../x", "data.train_split='../x'")],
    "data.val_split": [("''", "data.val_split='' is not allowed")],
    "data.crop_size": [("0", "data.crop_size=0 is not allowed (expected an integer >= 8)")],
    "data.scale_min": [("0", "data.scale_min=0.0 is not allowed"), ("3", "data.scale_min=3.0")],
    "data.scale_max": [(".inf", "data.scale_max=inf is not allowed")],
    "data.batch_size": [("0", "data.batch_size=0 is not allowed")],
    "data.loader_workers": [("-1", "data.loader_workers=-1 is not allowed")],
    "data.loader": [("dali", "data.loader='dali' is not allowed")],
    "train.iterations": [("0", "train.iterations=0 is not allowed")],
    "train.lr": [("0", "train.lr=0.0 is not allowed"), (".nan", "train.lr=nan"), (".inf", "train.lr=inf")],
    "train.momentum": [("1", "train.momentum=1.0 is not allowed"), ("-0.1", "train.momentum=-0.1")],
    "train.weight_decay": [("-1e-4", "train.weight_decay=-0.0001 is not allowed"), (".inf", "=inf")],
    "train.poly_power": [("0", "train.poly_power=0.0 is not allowed")],
    "train.head_lr_mult": [("0", "train.head_lr_mult=0.0 is not allowed"), (".nan", "head_lr_mult=nan")],
    "train.stem_lr_mult": [("0", "train.stem_lr_mult=0.0 is not allowed"), ("-1", "stem_lr_mult=-1.0")],
    "train.aux_weight": [("-0.4", "train.aux_weight=-0.4 is not allowed")],
    "train.ohem_thresh": [("0", "train.ohem_thresh=0.0 is not allowed"), ("1.5", "train.ohem_thresh=1.5")],
    "train.ohem_min_kept": [("-1", "train.ohem_min_kept=-1 is not allowed")],
    "train.class_weights": [("inverse", "train.class_weights='inverse' is not allowed")],
    "train.consistency_weight": [("-1", "train.consistency_weight=-1.0 is not allowed")],
    "train.amp": [("O3", "train.amp='O3' is not allowed (expected one of O0, O1, O2)")],
    "train.max_nonfinite": [("0", "train.max_nonfinite=0 is not allowed")],
    "train.seed": [("-1", "train.seed=-1 is not allowed"), ("4294967296", "train.seed=4294967296")],
    "train.log_every": [("0", "train.log_every=0 is not allowed")],
    "train.checkpoint_every": [("0", "train.checkpoint_every=0 is not allowed")],
    "train.keep_checkpoints": [("0", "train.keep_checkpoints=0 is not allowed")],
    "train.eval_every": [("-5", "train.eval_every=-5 is not allowed")],
    "eval.mode": [("tiles", "eval.mode='tiles' is not allowed")],
    "eval.crop_size": [("0", "eval.crop_size=0 is not allowed")],
    "eval.stride": [("0", "eval.stride=0 is not allowed")],
    "eval.scales": [("[]", "eval.scales=[] is not allowed"), ("[1.0, -1]", "eval.scales=[1.0, -1.0]")],
    "eval.fusion": [("votes", "eval.fusion='votes' is not allowed")],
    "eval.max_images": [("0", "eval.max_images=0 is not allowed")],
    "run.name": [("../escape", "run.name='../escape' is not allowed"), ("''", "run.name=''")],
    "run.storage": [("s3://", "run.storage"), ("gs://bucket/runs", "unsupported scheme 'gs'")],
    "run.num_workers": [("0", "run.num_workers=0 is not allowed")],
    "run.cpus_per_worker": [("0", "run.cpus_per_worker=0.0 is not allowed"), (".inf", "cpus_per_worker=inf")],
    "run.max_failures": [("-2", "run.max_failures=-2 is not allowed")],
    "run.resource_wait": [("-1", "run.resource_wait=-1.0 is not allowed")],
    "run.lease_ttl": [("0", "run.lease_ttl=0.0 is not allowed"), (".inf", "run.lease_ttl=inf")],
    "data.uri": [("s3://", "data.uri"), ("hdfs://nn/data", "unsupported scheme 'hdfs'")],
    "tracking.experiment": [("' '", "tracking.experiment=' ' is not allowed")],
    "tracking.settle_timeout": [("-1", "tracking.settle_timeout=-1.0 is not allowed")],
    "tracking.registered_model": [
        ("' '", "tracking.registered_model=' ' is not allowed"),
        ("a/b", "tracking.registered_model='a/b' is not allowed"),
    ],
    "tune.name": [("/abs", "tune.name='/abs' is not allowed")],
    "tune.num_samples": [("0", "tune.num_samples=0 is not allowed")],
    "tune.max_concurrent": [("0", "tune.max_concurrent=0 is not allowed")],
    "tune.metric": [("''", "tune.metric='' is not allowed")],
    "tune.mode": [("best", "tune.mode='best' is not allowed")],
    "tune.scheduler": [("pbt", "tune.scheduler='pbt' is not allowed")],
    "tune.grace_period": [("0", "tune.grace_period=0 is not allowed")],
    "tune.reduction_factor": [("1", "tune.reduction_factor=1 is not allowed")],
    "tune.seeds": [
        ("[]", "tune.seeds=[] is not allowed"),
        ("[1, 1]", "tune.seeds=[1, 1]"),
        ("[-1]", "tune.seeds=[-1]"),
    ],
    "tune.space": [("{train.lr: {choice: []}}", "choice needs at least one value")],
    "tune.baseline": [("fcn", "tune.baseline='fcn' is not allowed (expected null or one of tune.variants")],
}
# Keys whose every value of the right type is usable (a wrong type is refused by the type check, tested in
# tests/pipeline/test_config.py), or that are checked where they are used, with the file named.
EXEMPT = {
    "model.pretrained": "a local file, 'imagenet' or 'none': checked when the backbone loads it, naming it",
    "model.align_corners": "bool or null",
    "model.sync_bn": "bool",
    "train.ohem": "bool",
    "train.no_decay_1d": "bool",
    "train.compile": "bool",
    "eval.flip": "bool",
    "run.ray": "bool",
    "run.use_gpu": "bool",
    "tune.variants": "each variant's overrides, checked by ccnet tune before anything starts "
    "(tests/faults/test_bad_search.py)",
    "tracking.uri": "parsed by the tracking module when it connects",
    "tracking.required": "bool",
}
CASES = [(key, value, text) for key, cases in NONSENSE.items() for value, text in cases]


def test_every_key_has_a_nonsense_case() -> None:
    keys = set(Config().flat())
    assert keys - set(NONSENSE) - set(EXEMPT) == set(), "add the new keys to NONSENSE (or EXEMPT, saying why)"
    assert set(NONSENSE) | set(EXEMPT) <= keys, "cases for keys that no longer exist"


@pytest.mark.parametrize(("key", "value", "text"), CASES, ids=[f"{k}={v}" for k, v, _ in CASES])
def test_nonsense_is_refused_naming_the_key(key: str, value: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{key}={value}"])
    message = str(info.value)
    assert text in message and "\n" not in message, message
    assert message.startswith("defaults: ") or message.startswith("--set: "), message


@pytest.mark.parametrize("key", ["train.lr", "model.attention", "run.lease_ttl"])
def test_the_command_line_shows_one_line_and_writes_nothing(key: str, tmp_path: Path) -> None:
    value, text = NONSENSE[key][0]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            "train",
            "--set",
            f"{key}={value}",
            "--set",
            "run.ray=false",
            "--set",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        ],
        cwd=tmp_path,
        env=env | {"PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR defaults: ") and text in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store


FLAGS = [
    ["data", "prepare", "--dataset", "generated", "--out", "x", "--workers", "0"],
    ["data", "prepare", "--dataset", "generated", "--out", "x", "--max-shard-mb", "-1"],
    ["data", "prepare", "--dataset", "generated", "--out", "x", "--image-size", "4"],
    ["data", "prepare", "--dataset", "generated", "--out", "x", "--seed", "-3"],
    ["data", "prepare", "--dataset", "generated", "--out", "x", "--count", "train=0"],
    ["data", "inspect", "x", "--limit", "0"],
    ["efficiency", "--feature-size", "0"],
    ["efficiency", "--channels", "4"],
    ["efficiency", "--batch", "nan"],
    ["efficiency", "--repeats", "-1"],
    ["efficiency", "--num-classes", "0"],
    ["jobs", "stop", "some-job", "--timeout", "-5"],
    ["schedule", "0 2 * * *", "train", "--max-runs", "0"],
    ["submit", "train", "--entrypoint-num-cpus", "inf"],
]


@pytest.mark.parametrize("argv", FLAGS, ids=[" ".join(a[-2:]) for a in FLAGS])
def test_nonsense_flags_are_one_usage_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR ccnet ") and argv[-2] in lines[0], lines
