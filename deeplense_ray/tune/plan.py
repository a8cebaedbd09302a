"""What a search decides before ``Tuner.fit``: every check that can fail does so here, naming the value.

:func:`plan_search` needs no cluster (settings, search space, TrainConfig overrides, the search directory and,
with resume, its saved state); :func:`prepare_cluster_work` runs once Ray is up (the per-trial request
against the cluster, the MLflow store, the dataset, the base TrainConfig of every trial). Either one's error
becomes a :class:`SearchSetupError` inside :func:`setup_errors`. ``search_state.json`` (settings + MLflow ids)
is what ``resume`` reads back.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from deeplense_ray.io import atomic_write_text
from deeplense_ray.tune.dataset import ensure_dataset
from deeplense_ray.tune.settings import (
    TuneSettings,
    check_cluster_resources,
    resolve_cpus_per_trial,
    resolve_gpus_per_trial,
)

STATE_FILE = "search_state.json"


class SearchSetupError(ValueError):
    """A bad option or input found while preparing a search, before any trial started."""


@contextmanager
def setup_errors() -> Iterator[None]:
    """Re-raise a ValueError, KeyError or FileNotFoundError as :class:`SearchSetupError` (same message)."""
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError) as exc:
        raise SearchSetupError(exc.args[0] if exc.args else str(exc)) from exc


@dataclass
class SearchPlan:
    """Everything :func:`~deeplense_ray.tune.runner.run_search` decided before ``Tuner.fit``."""

    name: str
    output_dir: str
    storage_path: str
    state: dict[str, Any] | None
    hparams: dict[str, Any]
    space: dict[str, Any]
    param_keys: list[str]
    concurrency: int = 1
    gpus: float = 0.0
    cpus: float = 1.0
    data_dir: str = ""
    tracking_uri: str = ""
    base_train: dict[str, Any] = field(default_factory=dict)

    @property
    def trainer_storage(self) -> str:
        """Where each trial's Ray Train run and checkpoints live (``trainers/<trial_id>/``)."""
        return os.path.join(self.output_dir, "trainers")


def default_search_name(model: str) -> str:
    return f"tune-{model.lower()}-{time.strftime('%Y%m%d-%H%M%S')}"


def find_latest_search(storage_path: str, model: str) -> str | None:
    """Newest ``tune-<model>-*`` search directory under ``storage_path`` holding a search state, or None."""
    if not os.path.isdir(storage_path):
        return None
    prefix = f"tune-{model.lower()}-"
    found = [
        d
        for d in os.listdir(storage_path)
        if d.startswith(prefix) and os.path.isfile(os.path.join(storage_path, d, STATE_FILE))
    ]
    return (
        max(found, key=lambda d: os.path.getmtime(os.path.join(storage_path, d, STATE_FILE)))
        if found
        else None
    )


def plan_search(settings: TuneSettings) -> SearchPlan:
    """Checks that need no cluster: settings, search space, TrainConfig overrides, the search directory."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.models import model_hparams
    from deeplense_ray.tune.spaces import search_space

    settings.validate()
    hparams = dict(model_hparams(settings.model))
    space = search_space(
        settings.model, overrides=settings.space, hparams=hparams, num_workers=settings.workers_per_trial
    )
    for p in settings.points_to_evaluate or []:
        extra = sorted(set(p) - set(space))
        if extra:
            raise ValueError(
                f"points_to_evaluate keys {extra} are not in the search space ({', '.join(space)})"
            )
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings.train_overrides) - fields)
    if unknown:
        raise ValueError(f"train_overrides {unknown} are not TrainConfig fields: {', '.join(sorted(fields))}")
    storage_path = os.path.abspath(settings.storage_path)
    state: dict[str, Any] | None = None
    if settings.resume:
        name = settings.name or find_latest_search(storage_path, settings.model)
        if name is None:
            raise ValueError(f"resume: no search of model {settings.model} under {storage_path!r}")
        state_path = os.path.join(storage_path, name, STATE_FILE)
        if not os.path.isfile(state_path):
            raise ValueError(f"resume: {state_path!r} does not exist (no search named {name!r})")
        with open(state_path) as f:
            state = json.load(f)
    else:
        name = settings.name or default_search_name(settings.model)
        if os.path.exists(os.path.join(storage_path, name, STATE_FILE)):
            raise ValueError(
                f"search {name!r} already exists under {storage_path!r}: pass resume=True (--resume) "
                "or a new name"
            )
    return SearchPlan(
        name=name,
        output_dir=os.path.join(storage_path, name),
        storage_path=storage_path,
        state=state,
        hparams=hparams,
        space=space,
        param_keys=sorted(space),
    )


def prepare_cluster_work(
    settings: TuneSettings, plan: SearchPlan, cluster: Mapping[str, float]
) -> SearchPlan:
    """Checks against the cluster, then the dataset (simulated if needed) and the base TrainConfig."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.tracking import resolve_tracking_uri

    plan.concurrency = check_cluster_resources(settings, cluster)
    plan.gpus = resolve_gpus_per_trial(settings, cluster)
    plan.cpus = resolve_cpus_per_trial(settings, cluster)
    plan.tracking_uri = (
        plan.state["tracking_uri"] if plan.state else resolve_tracking_uri(settings.tracking_uri)
    )
    if plan.state:
        plan.data_dir = plan.state["data_dir"]
    elif settings.simulate:  # online: no dataset written; val/test from data_dir if given
        plan.data_dir = os.path.abspath(settings.data_dir) if settings.data_dir is not None else ""
    else:
        plan.data_dir = ensure_dataset(settings, plan.storage_path)
    online = {"simulate": settings.preset, "sim_overrides": dict(settings.preset_overrides)}
    plan.base_train = dict(
        settings.train_overrides,
        **(online if settings.simulate else {}),
        model=settings.model,
        data_dir=plan.data_dir or None,
        epochs=settings.max_epochs,
        seed=settings.seed,
        num_workers=settings.workers_per_trial,
        gpus_per_worker=plan.gpus,
        cpus_per_worker=plan.cpus,
        experiment=settings.experiment,
        tracking_uri=plan.tracking_uri,
        storage_path=plan.trainer_storage,
        model_size=settings.model_size,
    )
    # a running trial keeps its best checkpoint by the search metric and the latest (for resume)
    plan.base_train.setdefault("num_to_keep", 1)
    TrainConfig(**plan.base_train).validate()
    return plan


def write_search_state(
    settings: TuneSettings, plan: SearchPlan, *, experiment_id: str, parent_run_id: str
) -> dict[str, Any]:
    """Write ``<output_dir>/search_state.json`` (what ``resume`` reads back); returns the state."""
    state = {
        "name": plan.name,
        "settings": settings.to_dict(),
        "data_dir": plan.data_dir,
        "tracking_uri": plan.tracking_uri,
        "experiment_id": experiment_id,
        "parent_run_id": parent_run_id,
        "param_keys": plan.param_keys,
    }
    os.makedirs(plan.output_dir, exist_ok=True)
    text = json.dumps(state, indent=2, default=str)
    atomic_write_text(os.path.join(plan.output_dir, STATE_FILE), text, fsync=False)
    return state
