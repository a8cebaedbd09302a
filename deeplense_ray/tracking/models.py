"""The classifier as an MLflow model ("models from code"), and the Model Registry.

A logged model is a ``python_function`` model whose code is the package file ``pyfunc_model.py`` (beside this
one; MLflow stores a copy with the model) and whose two artifacts are data, never a pickled object:

- ``spec`` (``spec.json``): the architecture (registry name, size, overrides, image shape, classes, pixel
  scale, normalisation) from which the installed package rebuilds the network;
- ``weights``: its state_dict, read with ``torch.load(weights_only=True)``.

``mlflow.pyfunc.load_model(uri).predict(images)`` returns the class *probabilities* (softmax in float64) as a
DataFrame with one column per class, the same numbers ``jobs/predict.py`` writes; ``.unwrap_python_model()
.module`` is the network (raw float32 images [B, C, H, W] -> logits; the per-image normalisation is inside).
``mlflow models serve -m models:/NAME@champion --env-manager local`` serves it (the environment must have
``deeplense_ray`` importable); its JSON input is ``{"inputs": [[[[...]]]]}``, images [N, C, H, W].
:func:`load_logged_model` reads the two artifacts of a downloaded model without running the stored code
(``jobs/predict.py`` loads models that way).

Every logged model has a tensor signature (float32 [-1, C, H, W] -> one double column per class), an input
example (one image of the training data) and the architecture in its metadata (``deeplense.arch``: model,
size, overrides, image shape, classes, pixel scale, normalisation), from which ``jobs/predict.py`` rebuilds
the preprocessing. :func:`register_model` registers a logged model and can point an alias (``champion``)
at it. Models in the pickle format (the ``pytorch`` flavor) load only where the user
trusts the store (``jobs/predict.py --trust-pickled-model``); their pyfunc is :func:`_load_pyfunc` below.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

MODEL_ARTIFACT = "model"
METADATA_KEY = "deeplense"
#: The package file MLflow stores with each model and runs to load it (``mlflow.models.set_model`` inside).
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
#: The artifacts of a logged model (names in its MLmodel's python_function flavor) and the spec's file.
SPEC_ARTIFACT = "spec"
WEIGHTS_ARTIFACT = "weights"
SPEC_FILE = "spec.json"
SPEC_FORMAT = 1
#: The module MLflow imports to load the python_function flavor of a model in the pickle format.
PYFUNC_LOADER = "deeplense_ray.tracking.models"


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


def output_columns(arch: Mapping[str, Any]) -> list[str]:
    """The pyfunc's output columns: one per class, or for a model of task 'inference' ``mean_<target>`` and
    ``std_<target>`` per target (physical units)."""
    if arch.get("task") == "inference":
        targets = [str(t) for t in arch["targets"]]
        return [f"mean_{t}" for t in targets] + [f"std_{t}" for t in targets]
    return [str(c) for c in arch["class_names"]]


def classifier_signature(image_shape: Sequence[int], class_names: Sequence[str]):
    """float32 tensor [-1, C, H, W] in, one double column per class (or per :func:`output_columns`) out."""
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
    """Log ``model`` (a :class:`NormalizedClassifier`) into run ``run_id`` (module docstring); its URI.

    ``arch``: the checkpoint's architecture dict (``meta.json["arch"]``); ``input_example``: float32 images
    [n, C, H, W] (default: one image of zeros). The example is checked by MLflow through the pyfunc.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="deeplense-model-") as tmp:
        weights = Path(tmp) / "weights.pt"
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        return _log_weights(tracking_uri, run_id, weights, arch, input_example)


def log_checkpoint_model(
    checkpoint: Any, tracking_uri: str, run_id: str, *, input_example: np.ndarray | None = None
) -> str:
    """:func:`log_classifier_model` of a training checkpoint (directory or ``ray.train.Checkpoint``): its
    ``model.pt`` (a state_dict) is logged as the weights as it is, nothing is rebuilt."""
    from deeplense_ray.train.checkpoint import MODEL_FILE, _as_dir, read_meta

    with _as_dir(checkpoint) as d:
        return _log_weights(tracking_uri, run_id, Path(d) / MODEL_FILE, read_meta(d)["arch"], input_example)


def _log_weights(
    tracking_uri: str, run_id: str, weights: Path, arch: Mapping[str, Any], input_example: np.ndarray | None
) -> str:
    import mlflow

    from deeplense_ray.tracking.mlflow_utils import use_tracking_uri

    shape = [int(v) for v in arch["image_shape"]]
    names = output_columns(arch)
    if input_example is None:
        input_example = np.zeros((1, *shape), np.float32)
    example = np.ascontiguousarray(input_example, dtype=np.float32)
    if list(example.shape[1:]) != shape:
        raise ValueError(f"input example shape {list(example.shape)} does not match image shape {shape}")
    plain_arch = _plain(dict(arch))
    with tempfile.TemporaryDirectory(prefix="deeplense-spec-") as tmp:
        spec = Path(tmp) / SPEC_FILE
        spec.write_text(json.dumps({"format": SPEC_FORMAT, "arch": plain_arch}, indent=2, sort_keys=True))
        # MLflow checks the example by loading the logged model and predicting, on CUDA where the process
        # sees a GPU: the CPU does for one example, and a driver that holds no GPU must not create a CUDA
        # context on one a training task uses (a user's MLFLOW_DEFAULT_PREDICTION_DEVICE wins)
        with use_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id), _env_default(
            "MLFLOW_DEFAULT_PREDICTION_DEVICE", "cpu"
        ):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=str(PYFUNC_CODE),
                artifacts={SPEC_ARTIFACT: str(spec), WEIGHTS_ARTIFACT: str(weights)},
                signature=classifier_signature(shape, names),
                input_example=example,
                pip_requirements=model_requirements(),
                metadata={METADATA_KEY: {"arch": plain_arch, "input_dtype": "float32"}},
            )
    return info.model_uri


# ---------------------------------------------------------------------------------------------- loading
def prediction_device() -> str:
    """Where a loaded pyfunc predicts: ``$MLFLOW_DEFAULT_PREDICTION_DEVICE`` (as MLflow's own flavors), else
    CUDA when the process sees a GPU, else the CPU."""
    from deeplense_ray.infer.model import default_device

    return os.environ.get("MLFLOW_DEFAULT_PREDICTION_DEVICE") or default_device()


def read_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The architecture in a logged model's ``spec.json``; ValueError naming the file when it is not one."""
    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"model spec {path} is not readable JSON: {exc}") from exc
    arch = spec.get("arch") if isinstance(spec, dict) and spec.get("format") == SPEC_FORMAT else None
    if not isinstance(arch, dict):
        raise ValueError(f"model spec {path} is not a spec of format {SPEC_FORMAT} with an 'arch' object")
    return arch


def module_from_artifacts(spec: str | os.PathLike[str], weights: str | os.PathLike[str]) -> Any:
    """The network of a logged model: rebuilt by the package from ``spec``, its state_dict read from
    ``weights`` with weights_only loading (CheckpointError naming the file otherwise); eval mode, CPU."""
    from deeplense_ray.train.checkpoint import load_weights

    return load_weights(read_spec(spec), weights)


def is_weights_model(flavors: Mapping[str, Any]) -> bool:
    """Whether an MLmodel's flavors are those of a model logged by :func:`log_classifier_model`."""
    artifacts = (flavors.get("python_function") or {}).get("artifacts") or {}
    return SPEC_ARTIFACT in artifacts and WEIGHTS_ARTIFACT in artifacts


def load_logged_model(model_dir: str | os.PathLike[str]) -> tuple[Any, dict[str, Any]]:
    """(network, architecture) of a model logged by :func:`log_classifier_model` and downloaded to
    ``model_dir``: reads its MLmodel (YAML), spec (JSON) and weights (weights_only), runs none of its code.
    ValueError naming the file when an artifact is missing or lies outside ``model_dir``."""
    from mlflow.models import Model

    root = Path(model_dir).resolve()
    flavors = Model.load(str(root)).flavors
    if not is_weights_model(flavors):
        raise ValueError(f"{root} is not a model with {SPEC_ARTIFACT!r} and {WEIGHTS_ARTIFACT!r} artifacts")
    paths = {}
    for name in (SPEC_ARTIFACT, WEIGHTS_ARTIFACT):
        rel = str((flavors["python_function"]["artifacts"][name] or {}).get("path", ""))
        path = (root / rel).resolve()
        if not rel or not path.is_relative_to(root) or not path.is_file():
            raise ValueError(f"model {root}: artifact {name!r} ({rel!r}) is not a file inside the model")
        paths[name] = path
    arch = read_spec(paths[SPEC_ARTIFACT])
    return module_from_artifacts(paths[SPEC_ARTIFACT], paths[WEIGHTS_ARTIFACT]), arch


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
    """What the pyfunc predicts with: images [N, C, H, W] -> DataFrame of class probabilities (rows sum to
    1)."""

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


class PosteriorModel:
    """What the pyfunc of a model of task 'inference' predicts with: images [N, C, H, W] -> DataFrame of the
    per-lens posterior mean and standard deviation of every target, physical units (``mean_<t>``,
    ``std_<t>``; the full covariance: ``deeplense_ray.infer.model.gaussian_posteriors``)."""

    def __init__(self, module: Any, device: Any, arch: Mapping[str, Any]):
        self.module = module.eval()
        self.device = device
        self.arch = dict(arch)

    def get_raw_model(self) -> Any:
        return self.module

    def predict(self, data: Any, params: Mapping[str, Any] | None = None):
        import pandas as pd

        from deeplense_ray.infer.model import gaussian_posteriors

        if isinstance(data, pd.DataFrame):
            raise TypeError("the model takes images as a float32 array [N, C, H, W], not a DataFrame")
        images = np.asarray(data, np.float32)
        mean, cov = gaussian_posteriors(self.module, self.arch, images, device=self.device)
        std = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        return pd.DataFrame(np.concatenate([mean, std], axis=1), columns=output_columns(self.arch))


def prediction_model(module: Any, device: Any, arch: Mapping[str, Any] | None = None):
    """The pyfunc's predictor of a logged model: :class:`PosteriorModel` for task 'inference', else
    :class:`ProbabilityModel`."""
    if arch is not None and arch.get("task") == "inference":
        return PosteriorModel(module, device, arch)
    return ProbabilityModel(module, device)


def _load_pyfunc(path: str, model_config: Mapping[str, Any] | None = None) -> ProbabilityModel:
    """Called by ``mlflow.pyfunc.load_model`` for a model in the pickle format (it unpickles the
    module): the pytorch flavor's loader (it picks the device), wrapped."""
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
