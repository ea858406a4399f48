"""What a run decided once, for every process that works for it: :class:`RunSpec`.

:func:`pipeline.train.context.open_run` makes it in the driver, after the run's checks: the frozen config, the
run's name, its folder, the tracking URI and the dataset's manifest. It reaches the Ray Train workers in
``train_loop_config`` and a search's trials through ``tune.with_parameters`` (not through the search space,
which Tune saves to disk), so no process resolves, derives or reads any of them again. A trial's spec is its
search's, with the trial's overrides applied (:meth:`RunSpec.derive`). With ``train.class_weights`` it also
holds the loss's class weights, counted once over the train split's labels."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import Config, ConfigError, apply_overrides, config_from_dict
from pipeline.data.balance import class_pixels, median_frequency_weights
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
        class_weights: the loss's weight per class (``train.class_weights``), None for the unweighted loss.
    """

    config: Config
    name: str
    run_uri: str
    tracking_uri: str = field(repr=False)  # may hold credentials
    manifest: Manifest
    parent_run_id: str | None = None
    class_weights: tuple[float, ...] | None = None

    def derive(self, overrides: list[str], name: str, parent_run_id: str | None, source: str) -> RunSpec:
        """The spec of a run made from this one (a search's trial): the config with ``overrides`` applied
        (``run.name`` set to ``name``) and checked, the same tracking URI, the same manifest unless the
        overrides change ``data.uri``."""
        values = apply_overrides(self.config.to_dict(), overrides)
        values["run"]["name"] = name  # as it is, not parsed as YAML as an override's value is
        config = config_from_dict(values, source=source)
        same_data = config.data.uri == self.config.data.uri
        manifest = self.manifest if same_data else open_manifest(config.data.uri)
        same_weights = same_data and _weighing(config) == _weighing(self.config)
        weights = self.class_weights if same_weights else class_weights(config, manifest)
        run_uri = run_uri_of(config.run.storage, name)
        return RunSpec(config, name, run_uri, self.tracking_uri, manifest, parent_run_id, weights)

    @classmethod
    def of(cls, config: Config, tracking_uri: str = "") -> RunSpec:
        """The spec of ``config`` for a run started outside :func:`~pipeline.train.context.open_run` (a test,
        a notebook): its manifest read, none of open_run's checks, untracked unless ``tracking_uri``."""
        name = config.run.name
        manifest = open_manifest(config.data.uri)
        run_uri = run_uri_of(config.run.storage, name)
        return cls(
            config, name, run_uri, tracking_uri, manifest, class_weights=class_weights(config, manifest)
        )


def class_weights(config: Config, manifest: Manifest) -> tuple[float, ...] | None:
    """The loss's class weights that ``config.train.class_weights`` asks for, counted over the train split
    of ``manifest``'s dataset (every label read once); None for "none"."""
    if config.train.class_weights == "none":
        return None
    counts = class_pixels(config.data.uri, manifest, config.data.train_split)
    try:
        return median_frequency_weights(counts)
    except ValueError as error:
        raise ConfigError(
            f"train.class_weights={config.train.class_weights}: split {config.data.train_split!r} of "
            f"{storage.redact(config.data.uri)}: {error}"
        ) from None


def _weighing(config: Config) -> tuple[str, str]:
    """What the class weights depend on besides the dataset version."""
    return config.train.class_weights, config.data.train_split
