"""Using a trained model: load it with its preprocessing, predict on HDF5 / .npy / FITS images, and import the
published DeepLense .npy sets as sharded HDF5 datasets. See docs/inference.md."""

from __future__ import annotations

from deeplense_ray.infer.inputs import InputError, plan_inputs
from deeplense_ray.infer.model import LoadedModel, class_probabilities, load_classifier
from deeplense_ray.infer.predict import PredictResult, run_prediction

__all__ = [
    "InputError",
    "LoadedModel",
    "PredictResult",
    "class_probabilities",
    "load_classifier",
    "plan_inputs",
    "run_prediction",
]
