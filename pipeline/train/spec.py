"""What a run decided once, for every process that works for it: :class:`RunSpec`.

:func:`pipeline.train.context.open_run` makes it in the driver, after the run's checks: the frozen config, the
run's name, its folder, the tracking URI and the dataset's manifest. It reaches the Ray Train workers in
``train_loop_config`` and a search's trials through ``tune.with_parameters`` (not through the search space,
which Tune saves to disk), so no process resolves, derives or reads any of them again. A trial's spec is its
search's, with the trial's overrides applied (:meth:`RunSpec.derive`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import Config, apply_overrides, config_from_dict
from pipeline.data.readers import open_manifest
from pipeline.data.schema import Manifest
from pipeline.io import storage


def run_uri_of(storage_uri: str, name: str) -> str:
    """Where run ``name`` keeps its checkpoints: ``<run.storage>/<name>``."""
    return storage.join(storage_uri, name)


@dataclass(frozen=True)
class RunSpec:
    """A run's decisions, made once in the driver and handed to every process (pickled by Ray).

    Attributes:
        config: the run's config, validated, frozen, every location absolute.
        name: the run's name: ``run.name`` for a training (and a search's trial), ``tune.name`` for a search.
        run_uri: where its checkpoints live: ``<run.storage>/<name>``.
        tracking_uri: where it is tracked (``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else sqlite); it
            may hold credentials (from the environment), so it is never logged nor written to disk.
        manifest: the dataset version's manifest (``data.uri``), read once.
        parent_run_id: the tracked run this one is nested under (a trial's search), else None.
    """

    config: Config
    name: str
    run_uri: str
    tracking_uri: str = field(repr=False)  # may hold credentials
    manifest: Manifest
    parent_run_id: str | None = None

    def derive(self, overrides: list[str], name: str, parent_run_id: str | None, source: str) -> RunSpec:
        """The spec of a run made from this one (a search's trial): the config with ``overrides`` applied
        (``run.name`` set to ``name``) and checked, the same tracking URI, the same manifest unless the
        overrides change ``data.uri``."""
        values = apply_overrides(self.config.to_dict(), overrides)
        values["run"]["name"] = name  # as it is, not parsed as YAML as an override's value is
        config = config_from_dict(values, source=source)
        same_data = config.data.uri == self.config.data.uri
        manifest = self.manifest if same_data else open_manifest(config.data.uri)
        return RunSpec(
            config, name, run_uri_of(config.run.storage, name), self.tracking_uri, manifest, parent_run_id
        )

    @classmethod
    def of(cls, config: Config, tracking_uri: str = "") -> RunSpec:
        """The spec of ``config`` for a run started outside :func:`~pipeline.train.context.open_run` (a test,
        a notebook): its manifest read, none of open_run's checks, untracked unless ``tracking_uri``."""
        name = config.run.name
        manifest = open_manifest(config.data.uri)
        return cls(config, name, run_uri_of(config.run.storage, name), tracking_uri, manifest)
