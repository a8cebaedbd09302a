"""The classifier as an MLflow model, and the Model Registry.

One logged model carries two flavors:

- ``pytorch``: ``mlflow.pytorch.load_model(uri)`` returns the trained module (raw float32 images
  [B, C, H, W] -> logits; the per-image normalisation is inside it), as before;
- ``python_function``: ``mlflow.pyfunc.load_model(uri).predict(images)`` returns the class *probabilities*
  (softmax in float64) as a DataFrame with one column per class, the same numbers ``jobs/predict.py`` writes.
  ``mlflow models serve -m models:/NAME@champion --env-manager local`` serves it (the environment must have
  ``deeplense_ray`` importable); its JSON input is ``{"inputs": [[[[...]]]]}``, images [N, C, H, W].

Every logged model has a tensor signature (float32 [-1, C, H, W] -> one double column per class), an input
example (one image of the training data) and the architecture in its metadata (``deeplense.arch``: model,
size, overrides, image shape, classes, pixel scale, normalisation), from which ``jobs/predict.py`` rebuilds
the preprocessing. :func:`register_model` registers a logged model and can point an alias (``champion``)
at it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

MODEL_ARTIFACT = "model"
METADATA_KEY = "deeplense"
#: The module MLflow imports to load the python_function flavor (its ``_load_pyfunc``).
PYFUNC_LOADER = "deeplense_ray.tracking.models"


class _ClassifierFlavor:
    """What ``mlflow.models.Model.log`` calls as a flavor module: the pytorch flavor's ``save_model``, then
    the python_function flavor pointed at :data:`PYFUNC_LOADER` (probabilities instead of logits)."""

    __name__ = "pytorch"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
        import mlflow.pytorch
        from mlflow.models.model import MLMODEL_FILE_NAME

        mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        mlflow_model.flavors["python_function"]["loader_module"] = PYFUNC_LOADER
        mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))


def model_requirements() -> list[str]:
    """pip requirements recorded with the model (``deeplense_ray`` itself must be importable to load it)."""
    import torch

    import deeplense_ray

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"deeplense-ray=={deeplense_ray.__version__}",
        "einops",
        "numpy",
        "pandas",
    ]


def classifier_signature(image_shape: Sequence[int], class_names: Sequence[str]):
    """float32 tensor [-1, C, H, W] in, one double column per class out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    c, h, w = (int(v) for v in image_shape)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),
        outputs=Schema([ColSpec("double", str(name)) for name in class_names]),
    )


def log_classifier_model(
    tracking_uri: str,
    run_id: str,
    model: Any,
    *,
    arch: Mapping[str, Any],
    input_example: np.ndarray | None = None,
) -> str:
    """Log ``model`` (a :class:`NormalizedClassifier`) into run ``run_id`` with both flavors; returns its URI.

    ``arch``: the checkpoint's architecture dict (``meta.json["arch"]``); ``input_example``: float32 images
    [n, C, H, W] (default: one image of zeros). The example is checked by MLflow through the pyfunc.
    """
    import mlflow
    from mlflow.models import Model

    from deeplense_ray.tracking.mlflow_utils import use_tracking_uri

    shape = [int(v) for v in arch["image_shape"]]
    names = [str(c) for c in arch["class_names"]]
    if input_example is None:
        input_example = np.zeros((1, *shape), np.float32)
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    if list(example.shape[1:]) != shape:
        raise ValueError(f"input example shape {list(example.shape)} does not match image shape {shape}")
    # MLflow checks the example by loading the logged model and predicting, on CUDA where the process sees a
    # GPU: the CPU does for one example, and a driver that holds no GPU must not create a CUDA context on one
    # a training task uses (a user's MLFLOW_DEFAULT_PREDICTION_DEVICE wins)
    with use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id), _env_default(
        "MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu"
    ):
        info = Model.log(
            None,  # artifact_path (deprecated; the name is the model's name)
            name=MODEL_ARTIFACT,
            flavor=_ClassifierFlavor,
            flavor_name="pytorch",
            run_id=run_id,
            pytorch_model=model,
            signature=classifier_signature(shape, names),
            input_example=example,
            pip_requirements=model_requirements(),
            serialization_format="pickle",
            metadata={METADATA_KEY: {"arch": _plain(dict(arch)), "input_dtype": "float32"}},
        )
    return info.model_uri


def log_checkpoint_model(
    checkpoint: Any, tracking_uri: str, run_id: str, *, input_example: np.ndarray | None = None
) -> str:
    """:func:`log_classifier_model` of a training checkpoint (directory or ``ray.train.Checkpoint``)."""
    from deeplense_ray.train.checkpoint import load_model_from_checkpoint, read_meta

    return log_classifier_model(
        tracking_uri,
        run_id,
        load_model_from_checkpoint(checkpoint),
        arch=read_meta(checkpoint)["arch"],
        input_example=input_example,
    )


def example_images(data_dir: str | os.PathLike[str], n: int = 1) -> np.ndarray | None:
    """The first ``n`` images (float32) of a dataset's test split (else its first split); None if empty."""
    from deeplense_ray.data.manifest import load_manifest, shard_paths
    from deeplense_ray.data.shards import read_shard

    manifest = load_manifest(data_dir)
    splits = ["test"] if manifest["splits"].get("test", {}).get("rows") else list(manifest["splits"])
    for split in splits:
        for path in shard_paths(data_dir, split, manifest):
            images = read_shard(path, stop=n)["images"]
            if len(images):
                return images
    return None


def check_registered_name(name: str) -> str:
    """A registered model name, stripped; ValueError naming it when empty or holding '/', ':' or '@'."""
    text = str(name or "").strip()
    if not text or any(ch in text for ch in "/:@"):
        raise ValueError(f"registered model name must be non-empty without '/', ':' or '@', got {name!r}")
    return text


def register_model(
    model_uri: str,
    name: str,
    tracking_uri: str,
    *,
    alias: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Register ``model_uri`` as a new version of ``name`` (created if missing); set ``alias`` on it.

    Returns the version (a string). ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` then load it.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tracking.mlflow_utils import use_tracking_uri

    name = check_registered_name(name)
    with use_tracking_uri(tracking_uri):
        version = mlflow.register_model(model_uri, name, tags=dict(tags or {}) or None)
    if alias:
        MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(name, alias, version.version)
    return str(version.version)


@contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """``$name`` = ``value`` inside the block unless it is set already; restored after."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---------------------------------------------------------------------------------------------- pyfunc
class ProbabilityModel:
    """The python_function flavor: images [N, C, H, W] -> DataFrame of class probabilities (rows sum to 1)."""

    def __init__(self, module: Any, device: Any):
        self.module = module.eval()
        self.device = device
        self.class_names = [str(c) for c in getattr(module, "class_names", ())]

    def get_raw_model(self) -> Any:
        return self.module

    def predict(self, data: Any, params: Mapping[str, Any] | None = None):
        import pandas as pd

        from deeplense_ray.infer.model import class_probabilities

        if isinstance(data, pd.DataFrame):
            raise TypeError("the model takes images as a float32 array [N, C, H, W], not a DataFrame")
        probs = class_probabilities(self.module, np.asarray(data, dtype=np.float32), device=self.device)
        names = self.class_names or [f"class_{k}" for k in range(probs.shape[1])]
        return pd.DataFrame(probs, columns=names)


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> ProbabilityModel:
    """Called by ``mlflow.pyfunc.load_model``: the pytorch flavor's loader (it picks the device), wrapped."""
    import mlflow.pytorch

    wrapper = mlflow.pytorch._load_pyfunc(path, model_config=dict(model_config or {}))
    return ProbabilityModel(wrapper.get_raw_model(), wrapper.device)


def register_checkpoint(
    checkpoint: Any,
    name: str,
    *,
    tracking_uri: str,
    run_id: str,
    data_dir: str | os.PathLike[str] | None = None,
    alias: str | None = "champion",
) -> tuple[str, str]:
    """Log a checkpoint's model into run ``run_id`` (e.g. a search's parent run; an input example from
    ``data_dir``) and register it as a new version of ``name`` with ``alias``; (model URI, version)."""
    name = check_registered_name(name)
    example = example_images(data_dir) if data_dir is not None else None
    model_uri = log_checkpoint_model(checkpoint, tracking_uri, run_id, input_example=example)
    return model_uri, register_model(model_uri, name, tracking_uri, alias=alias)
