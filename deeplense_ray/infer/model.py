"""A trained classifier from a model URI, with the preprocessing it was trained with.

``runs:/RUN_ID/model``, ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``, ``models:/m-...``) are
downloaded from MLflow; a path loads a training checkpoint directory (``model.pt`` + ``meta.json``). Nothing
runs code from the model: the network is rebuilt by this package from the architecture (the model's
``spec.json``, the checkpoint's ``meta.json``); its weights are read with ``torch.load(weights_only=True)``.
A model logged in the pickle format (the ``pytorch`` flavor) is refused unless ``trust_pickled_model``
is set, which unpickles it, running whatever code the tracking store holds for it. Either way the module
takes raw float32 images [B, C, H, W] as the HDF5 shards hold them (its per-image normalisation is inside,
see ``train/modules.py``); there is no resize in training, so images must have the training image shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: Images per forward pass (fp32, no autocast: the numbers of the test evaluation).
PREDICT_BATCH_SIZE = 256


@dataclass(frozen=True)
class LoadedModel:
    """The module (eval mode, CPU) and what defines its input."""

    uri: str
    module: Any = field(repr=False)
    arch: dict[str, Any]
    source: str  # "checkpoint" | "mlflow"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = (int(v) for v in self.arch["image_shape"])
        return c, h, w

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self.arch["class_names"]]

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What happens to an image before the network (logged with every prediction run)."""
        return {
            "dtype": "float32",
            "image_shape": list(self.image_shape),
            "resize": "none (the training images' shape is required)",
            "normalize": str(self.arch.get("normalize", "none")),
        }


def is_mlflow_uri(uri: str) -> bool:
    """MLflow's own schemes and remote stores; anything else (a folder named ``httpckpt`` too) is a path."""
    schemes = ("runs:/", "models:/", "mlflow-artifacts:", "file:", "s3://", "gs://", "http://", "https://")
    return str(uri).startswith(schemes)


def load_classifier(
    uri: str, tracking_uri: str | None = None, *, trust_pickled_model: bool = False
) -> LoadedModel:
    """Load the model at ``uri`` (see the module docstring). ValueError / FileNotFoundError naming it (a
    refused weights file: :class:`~deeplense_ray.train.checkpoint.CheckpointError`, a ValueError)."""
    from deeplense_ray.train.checkpoint import META_FILE, MODEL_FILE, load_model_from_checkpoint, read_meta

    uri = str(uri).strip()
    if not uri:
        raise ValueError("--model-uri is empty")
    if not is_mlflow_uri(uri):
        path = Path(uri).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"model {uri!r} is neither an MLflow URI (runs:/RUN_ID/model, models:/NAME@ALIAS) nor an "
                "existing checkpoint directory"
            )
        if not (path / MODEL_FILE).is_file() or not (path / META_FILE).is_file():
            raise FileNotFoundError(
                f"{path} is not a training checkpoint directory (needs {MODEL_FILE} and {META_FILE})"
            )
        path = path.resolve()
        return LoadedModel(str(path), load_model_from_checkpoint(path), read_meta(path)["arch"], "checkpoint")
    return _load_mlflow(uri, tracking_uri, trust_pickled_model)


def _load_mlflow(uri: str, tracking_uri: str | None, trust_pickled_model: bool) -> LoadedModel:
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from deeplense_ray.tracking import resolve_tracking_uri, use_tracking_uri
    from deeplense_ray.tracking.models import METADATA_KEY, is_weights_model, load_logged_model

    store = resolve_tracking_uri(tracking_uri)
    with use_tracking_uri(store):
        try:
            info = get_model_info(uri)
            if is_weights_model(info.flavors):
                with tempfile.TemporaryDirectory(prefix="deeplense-model-") as tmp:
                    local = mlflow.artifacts.download_artifacts(uri, dst_path=tmp)
                    module, spec_arch = load_logged_model(local)
            elif "pytorch" in info.flavors and trust_pickled_model:
                import mlflow.pytorch

                module, spec_arch = mlflow.pytorch.load_model(uri, map_location="cpu").eval(), {}
            elif "pytorch" in info.flavors:
                raise ValueError(
                    f"model {uri!r} in {store} is a pickled torch module (MLflow pytorch flavor): loading "
                    "it would run code stored in the tracking store; pass --trust-pickled-model if you trust "
                    "everyone who can write to that store, or log the model again"
                )
            else:
                raise ValueError(f"model {uri!r} in {store} is not a classifier logged by this package")
        except (MlflowException, OSError) as exc:
            raise ValueError(f"cannot load model {uri!r} from tracking store {store}: {exc}") from exc
    arch = dict((info.metadata or {}).get(METADATA_KEY, {}).get("arch") or spec_arch)
    if not arch:  # a model logged before the metadata existed: its signature and the module tell the rest
        inputs = info.signature.inputs.inputs if info.signature is not None else []
        if len(inputs) != 1 or len(getattr(inputs[0], "shape", ())) != 4:
            raise ValueError(f"model {uri!r} has no deeplense metadata and no [-1, C, H, W] tensor signature")
        arch = {
            "image_shape": [int(v) for v in inputs[0].shape[1:]],
            "class_names": list(getattr(module, "class_names", ())),
            "normalize": getattr(module, "normalize", "none"),
        }
    if not arch.get("class_names"):
        raise ValueError(f"model {uri!r} does not name its classes")
    return LoadedModel(uri, module, arch, "mlflow")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def class_probabilities(
    module: Any, images: np.ndarray, *, device: Any = None, batch_size: int = PREDICT_BATCH_SIZE
) -> np.ndarray:
    """Softmax probabilities (float64 [N, num_classes]) of float32 images [N, C, H, W], fp32, in batches.

    The one forward path shared by ``jobs/predict.py`` (in-process and Ray actors) and the MLflow pyfunc, so
    both give the same numbers.
    """
    from deeplense_ray.train.steps import probabilities

    logits = head_outputs(module, images, device=device, batch_size=batch_size)
    if not len(logits):
        return np.zeros((0, len(getattr(module, "class_names", ()))), np.float64)
    return probabilities(logits)


def is_inference(arch: Mapping[str, Any]) -> bool:
    """A model of task 'inference' (per-lens Gaussian posteriors over ``arch["targets"]``)."""
    return arch.get("task") == "inference"


def head_outputs(
    module: Any, images: np.ndarray, *, device: Any = None, batch_size: int = PREDICT_BATCH_SIZE
) -> np.ndarray:
    """Raw network outputs (float64 [N, P]) of float32 images [N, C, H, W], fp32, in batches."""
    import torch

    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be float32 [N, C, H, W], got shape {list(x.shape)}")
    dev = torch.device(device or default_device())
    module = module.to(dev).eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size])).to(dev)
            out.append(module(batch).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float64)


def gaussian_posteriors(
    module: Any,
    arch: Mapping[str, Any],
    images: np.ndarray,
    *,
    device: Any = None,
    batch_size: int = PREDICT_BATCH_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """Task 'inference': the per-lens posterior (mean [N, T], covariance [N, T, T], physical units,
    float64) of images, de-standardised with the model's ``target_loc`` / ``target_scale``. The one forward
    path of ``jobs/predict.py`` and the MLflow pyfunc of such a model."""
    from deeplense_ray.train.gaussian import head_to_gaussian, to_physical

    t = len(arch["targets"])
    out = head_outputs(module, images, device=device, batch_size=batch_size)
    if len(out) == 0:
        return np.zeros((0, t)), np.zeros((0, t, t))
    mean, cov = head_to_gaussian(out, t)
    return to_physical(mean, cov, arch["target_loc"], arch["target_scale"])


def arch_params(model: LoadedModel) -> Mapping[str, Any]:
    """MLflow params describing the model of a prediction run."""
    return {
        "model_uri": model.uri,
        "model_source": model.source,
        "arch": dict(model.arch),
        "preprocessing": model.preprocessing,
    }


__all__ = [
    "LoadedModel",
    "class_probabilities",
    "default_device",
    "gaussian_posteriors",
    "head_outputs",
    "is_inference",
    "is_mlflow_uri",
    "load_classifier",
]
