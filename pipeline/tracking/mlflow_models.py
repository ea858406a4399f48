"""The models a training logs to MLflow, and the one it registers (:meth:`MlflowTracker.log_model`).

Each trained model is logged three ways, each named after its variant (e.g. ``criss_cross-R2-head-os8``):

- ``<variant>``: the **segmenter**, an MLflow pyfunc (:mod:`pipeline.tracking.segmenter`, logged as code,
  never pickled) whose artifacts are the ONNX graph and the training checkpoint: an image in, its class map
  out, by onnxruntime. This is the version registered: ``mlflow models serve -m models:/<name>@champion``
  serves it, and ``ccnet predict|evaluate --checkpoint models:/...`` read its checkpoint with
  ``weights_only=True``.
- ``<variant>-onnx``: the same graph in MLflow's onnx flavour (``mlflow.onnx.load_model``), for deployment
  tools that take ONNX.
- ``<variant>-pt2``: the PyTorch model as a ``torch.export`` program (dynamic batch, height and width),
  loaded by ``mlflow.pytorch.load_model`` without this package and without unpickling anything.

Without an ONNX file (``ccnet[onnx]`` not installed) only the pt2 model is logged, and registered, its
checkpoint an extra file.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

from pipeline.tracking.mlflow_store import CHAMPION_METRIC, image_signature, promote, register

SEGMENTER_CODE = Path(__file__).with_name("segmenter.py")


def _requirements(*packages: str) -> list[str]:
    """``package==installed version`` of each package."""
    return [f"{package}=={version(package)}" for package in packages]


def log_models(
    client: Any,
    run_id: str,
    model: Any,
    name: str,
    *,
    onnx_file: str | None,
    checkpoint: str | None,
    metrics: dict[str, float],
    registered_name: str | None,
    version_tags: dict[str, str],
) -> str | None:
    """Logs the model's forms (see the module's docstring) to run ``run_id`` through MLflow's global state,
    which the caller points at the run's store; links ``metrics`` to each; registers the segmenter (or the
    pt2 model) as a new version of ``registered_name`` and lets :func:`promote` decide its aliases. Returns
    the version, or None without ``registered_name``."""
    import mlflow.onnx  # lazy: MLflow (2 s to import) loads only where a run is tracked
    import mlflow.pyfunc
    import mlflow.pytorch
    import onnx
    from mlflow.models import Model

    signature, example = image_signature(model)
    logged = [
        mlflow.pytorch.log_model(
            model,
            name=f"{name}-pt2" if onnx_file else name,
            run_id=run_id,
            serialization_format="pt2",
            pip_requirements=_requirements("torch"),
            signature=signature,
            input_example=example,
            extra_files=[checkpoint] if checkpoint and not onnx_file else None,
        )
    ]
    if onnx_file:
        logged.append(
            mlflow.onnx.log_model(
                onnx.load(onnx_file),
                name=f"{name}-onnx",
                run_id=run_id,
                signature=signature,
                pip_requirements=_requirements("onnx", "onnxruntime"),
            )
        )
        artifacts = {"onnx_model": onnx_file, **({"checkpoint": checkpoint} if checkpoint else {})}
        logged.append(
            Model.log(  # mlflow.pyfunc.log_model, which takes no run_id
                artifact_path=None,
                name=name,
                run_id=run_id,
                flavor=mlflow.pyfunc,
                python_model=str(SEGMENTER_CODE),
                artifacts=artifacts,
                pip_requirements=_requirements("mlflow", "numpy", "pillow", "onnxruntime", "pandas"),
            )
        )
    for info in logged:
        for key, value in metrics.items():
            client.log_metric(run_id, key, value, model_id=info.model_id)
    if not registered_name:
        return None
    version = register(client, registered_name, logged[-1].model_id, run_id)
    promote(client, registered_name, version, metrics.get(CHAMPION_METRIC), version_tags)
    return version
