"""What a run's weights are: the model's architecture and the dataset version they were trained on.

A run writes its identity once, as ``<run.storage>/<name>/run.identity`` when it is first opened, and every
checkpoint carries it (``identity``). Continuing a run (the same ``run.name`` again) under another
architecture or on other data is refused before Ray, the lease or tracking start: the rest of the run would
train, and be evaluated, on something its first part never saw, under the old run's MLflow record. Evaluating
or predicting with a checkpoint under another architecture (``--set model.name=...``) is refused too: the
parameter names of two attentions can match, so the strict load alone does not catch it. Evaluating on
another version of the checkpoint's dataset is allowed when its classes are the same ones.

A search's identity (``ccnet tune``) also holds its definition: its grid (``tune.variants``, ``tune.seeds``,
``tune.space``, ...) and every setting its trials train and are evaluated with. Continuing a search under a
changed definition is refused too: Tune restores the grid it started with and ignores the new one (added
seeds would silently never run), while its unfinished trials would run under the new settings and its table
would mix the two. Where and how the trials run and are recorded (``run.*`` but the worker count,
``tracking.*``, ``tune.max_concurrent``, ``tune.baseline``, logging and checkpoint intervals) may change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from pipeline.config import Config, ModelConfig
from pipeline.data.schema import Manifest
from pipeline.io import storage
from pipeline.io.redaction import redact

IDENTITY_FILE = "run.identity"  # JSON; not "*.json": Tune's restore copies those (see lease.py)
# CCNetConfig fields that do not change what the weights mean: how the attention computes (same results),
# how gamma starts and where the initial backbone weights come from.
NOT_ARCHITECTURE = ("impl", "gamma_init", "pretrained")
# What a search's definition leaves out: the model's architecture (compared as above), the dataset's place
# (compared by digest), and where and how the trials run and are recorded.
SEARCH_SECTIONS = ("data", "train", "eval", "tune")
SEARCH_FREE = frozenset(
    {
        "data.uri",
        "data.loader",
        "data.loader_workers",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.compile",
        "train.max_nonfinite",
        "tune.name",
        "tune.max_concurrent",
        "tune.baseline",
    }
)


class IdentityError(ValueError):
    """A run or a checkpoint asked to go on under another model or on another dataset."""


def architecture(model: ModelConfig) -> dict[str, Any]:
    """The resolved model's fields that define its weights (the registered preset with the overrides)."""
    values = dataclasses.asdict(model.resolved())
    return {key: value for key, value in sorted(values.items()) if key not in NOT_ARCHITECTURE}


def dataset_digest(manifest: Manifest, split: str | None = None) -> str:
    """The dataset version's content (or one split's): a sha256 over its shards' checksums (its name and
    path aside)."""
    shards = sorted(shard.sha256 for shard in manifest.shards if split is None or shard.split == split)
    return hashlib.sha256("".join(shards).encode()).hexdigest()


def search_definition(config: Config) -> dict[str, Any]:
    """What a search's trials are and compute beyond the model's architecture: ``{"section.key": value}`` over
    the sections data, train, eval and tune (:data:`SEARCH_FREE` aside), with ``model.gamma_init``,
    ``model.pretrained`` and ``run.num_workers`` (the global batch); JSON values."""
    values = config.to_dict()
    flat = {
        f"{section}.{key}": value for section in SEARCH_SECTIONS for key, value in values[section].items()
    }
    flat |= {
        "model.gamma_init": config.model.resolved().gamma_init,
        "model.pretrained": config.model.pretrained,
        "run.num_workers": config.run.num_workers,
    }
    chosen = {key: value for key, value in sorted(flat.items()) if key not in SEARCH_FREE}
    return dict(json.loads(json.dumps(chosen)))


def run_identity(config: Config, manifest: Manifest, search: bool = False) -> dict[str, Any]:
    """What the run's weights are: ``model`` (name and architecture) and ``dataset`` (name, version, digest,
    classes and where it was read); with ``search``, the search's ``definition``."""
    definition = {"search": search_definition(config)} if search else {}
    return {
        **definition,
        "model": {"name": config.model.name, "architecture": architecture(config.model)},
        "dataset": {
            "name": manifest.dataset,
            "version": manifest.version,
            "digest": dataset_digest(manifest),
            "classes": list(manifest.classes),
            "uri": config.data.uri,
        },
    }


def _model_change(saved: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    if saved["model"]["architecture"] == wanted["model"]["architecture"]:
        return None
    old, new = saved["model"]["architecture"], wanted["model"]["architecture"]
    fields = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    changes = ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in fields)
    return f"model {saved['model']['name']} -> {wanted['model']['name']} ({changes})"


def _dataset(identity: dict[str, Any]) -> str:
    data = identity["dataset"]
    return f"{data['name']}/{data['version']} at {redact(data['uri'])}"


def _search_changes(old: dict[str, Any], new: dict[str, Any], relaxed: tuple[str, ...] = ()) -> list[str]:
    keys = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key) and key not in relaxed]
    return [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in keys]


def _weights_changes(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    changes = [change for change in (_model_change(saved, wanted),) if change]
    if saved["dataset"] is not None and saved["dataset"]["digest"] != wanted["dataset"]["digest"]:
        changes.append(f"data.uri {_dataset(saved)} -> {_dataset(wanted)} (other images)")
    return changes


def check_continuation(
    saved: dict[str, Any], config: Config, manifest: Manifest, what: str, search: bool = False
) -> None:
    """Refuses to continue ``what`` (``run 'x'``, ``search 'y'``) whose weights are ``saved`` under another
    architecture or on another dataset version (another digest: a dataset moved elsewhere unchanged is the
    same one); with ``search``, under a changed search definition too (one saved before searches recorded
    theirs is not compared)."""
    wanted = run_identity(config, manifest, search=search)
    changes = _weights_changes(saved, wanted)
    if search and "search" in saved:
        changes += _search_changes(saved["search"], wanted["search"])
    if changes:
        started = "started" if search else "trained"
        why = " (a resumed search keeps the grid and settings it started with)" if search else ""
        key = "tune.name" if search else "run.name"
        raise IdentityError(
            f"{what} was {started} as {saved['model']['name']} on {_dataset(saved)}; continuing it would "
            f"change {'; '.join(changes)}{why}. Give this {'search' if search else 'training'} another "
            f"{key}, or undo the change"
        )


def study_differences(
    saved: dict[str, Any], definition: dict[str, Any] | None, config: Config, manifest: Manifest
) -> list[str]:
    """How a finished search differs from the study ``config`` describes, seeds and variants aside (a study
    may gather searches run over other seeds or over some of its variants, each variant as the config
    defines it); empty: its trials belong. ``saved``: the search's identity, whose dataset may be None
    (unknown); ``definition``: its definition, None when unknown."""
    wanted = run_identity(config, manifest, search=True)
    changes = _weights_changes(saved, wanted)
    if definition is None:
        return changes
    changes += _search_changes(definition, wanted["search"], relaxed=("tune.seeds", "tune.variants"))
    variants, mine = definition.get("tune.variants", {}), config.tune.variants
    for name, overrides in sorted(variants.items()):
        if name not in mine:
            changes.append(f"tune.variants.{name} (not in the config's variants)")
        elif list(overrides) != list(mine[name]):
            changes.append(f"tune.variants.{name} {list(overrides)!r} -> {list(mine[name])!r}")
    return changes


def checkpoint_identity(state: dict[str, Any], saved_config: Config) -> dict[str, Any]:
    """A checkpoint's identity; for one older than identities, its model's from its saved config (its
    dataset then unknown: None)."""
    return state.get("identity") or {
        "model": {"name": saved_config.model.name, "architecture": architecture(saved_config.model)},
        "dataset": None,
    }


def check_checkpoint(
    saved: dict[str, Any], config: Config, classes: tuple[str, ...] | None, checkpoint: str
) -> None:
    """Refuses to run ``checkpoint`` (its identity ``saved``) under another architecture than its own, or on
    a dataset with other classes (``classes``: None when unknown)."""
    where = redact(checkpoint)
    change = _model_change(
        saved, {"model": {"name": config.model.name, "architecture": architecture(config.model)}}
    )
    if change:
        trained = f" trained on {_dataset(saved)}" if saved["dataset"] else ""
        raise IdentityError(
            f"{where} holds a {saved['model']['name']}{trained}; --set would change "
            f"{change}. Its weights run only under their own model"
        )
    if saved["dataset"] and classes is not None and list(classes) != saved["dataset"]["classes"]:
        count = len(saved["dataset"]["classes"])
        raise IdentityError(
            f"{where} was trained on {_dataset(saved)} ({count} classes); "
            f"data.uri={redact(config.data.uri)} has other classes ({len(classes)})"
        )


def read_identity(run_uri: str) -> dict[str, Any] | None:
    """The identity a run wrote when first opened; None for a new run (or one older than identities)."""
    uri = storage.join(run_uri, IDENTITY_FILE)
    return json.loads(storage.read_bytes(uri)) if storage.exists(uri) else None


def write_identity(run_uri: str, identity: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(run_uri, IDENTITY_FILE), json.dumps(identity, indent=2).encode() + b"\n")
