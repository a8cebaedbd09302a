"""What a run trained or predicted on, as MLflow reads it: the run's dataset inputs and the experiment's kind.

MLflow 3.17's UI shows a run's datasets in the runs table's "Dataset" column and on the run page, and opens an
experiment in its model-training view when the experiment tag ``mlflow.experimentKind`` says
``custom_model_development`` (without it, an experiment holding no traces may open in the GenAI view).

A project dataset (a directory of HDF5 shards with ``manifest.json``) is logged as an MLflow dataset
input: name = the directory's name, digest = the first 16 hex digits of the manifest's sha256 (the manifest
holds every shard's sha256, so the digest names the exact bytes), source = the directory's absolute path,
schema = the image shape, dtype and classes, profile = rows per split. An online-simulated run logs its
preset instead (:func:`simulation_entity`): the images are a function of the preset, overrides and seeds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
CONTEXT_TAG = "mlflow.data.context"  # MLflow's own key: "training", "validation", "test", "inference"


def set_experiment_kind(client, experiment_id: str) -> None:
    """Tag the experiment as model development unless it already has a kind (a user's choice is kept)."""
    exp = client.get_experiment(experiment_id)
    if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)


def dataset_entity(data_dir: str | Path):
    """The MLflow ``Dataset`` entity of a project dataset directory (reads its manifest)."""
    from mlflow.entities import Dataset

    from deeplense_ray.data.manifest import MANIFEST_NAME, load_manifest

    path = Path(data_dir).resolve()
    manifest = load_manifest(path)
    digest = hashlib.sha256((path / MANIFEST_NAME).read_bytes()).hexdigest()[:16]
    schema = {"image_shape": manifest["image_shape"], "dtype": manifest.get("dtype", "float32"),
              "class_names": manifest["class_names"]}
    profile = {"rows": {k: v.get("rows") for k, v in manifest["splits"].items()},
               "preset": manifest["config"].get("preset")}
    return Dataset(name=path.name, digest=digest, source_type="local", source=json.dumps({"uri": str(path)}),
                   schema=json.dumps(schema), profile=json.dumps(profile))


def simulation_entity(preset: str, overrides: Mapping[str, Any] | None, seed: int):
    """The MLflow ``Dataset`` of images simulated on the fly from ``preset`` (+ overrides) and ``seed``."""
    from mlflow.entities import Dataset

    spec = {"preset": preset, "overrides": dict(overrides or {}), "seed": int(seed)}
    text = json.dumps(spec, sort_keys=True, default=str)
    return Dataset(name=f"online:{preset}", digest=hashlib.sha256(text.encode()).hexdigest()[:16],
                   source_type="code", source=text, schema=None, profile=None)


def log_dataset_input(client, run_id: str, dataset, context: str = "training") -> None:
    """Record ``dataset`` (from :func:`dataset_entity` / :func:`simulation_entity`) as an input of the run."""
    import time

    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    inputs = [DatasetInput(dataset, tags=[InputTag(CONTEXT_TAG, context)])]
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as exc:
            # Two runs logging the same new dataset at once (a study's parallel trainings): the SQL store
            # looks it up, then inserts it, so the slower insert fails on the unique (experiment, name,
            # digest); a retry finds the row the other run wrote.
            if "UNIQUE constraint failed" not in str(exc) or attempt == 2:
                raise
            time.sleep(0.2 * (attempt + 1))
