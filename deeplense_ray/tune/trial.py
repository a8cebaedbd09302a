"""One trial of a search: a Tune function trainable around one ``TorchTrainer.fit()`` of the training loop.

The Ray Train V2 pattern: :func:`train_trial` builds the training issue's ``TorchTrainer`` with
:func:`deeplense_ray.train.build_trainer` and calls ``.fit()``; a ``TuneReportCallback`` in the trainer's
``RunConfig`` forwards rank 0's per-epoch metrics to Tune, through :func:`sanitize_result` (a diverged epoch
becomes the worst finite metric, and :class:`DivergedStopper` ends the trial). Each trial's config carries
everything it needs (:func:`param_space`: the sampled values + ``_search``); nothing is shared between trials.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from deeplense_ray.tune.diverged import DivergedStopper, diverged_value, sanitize_result
from deeplense_ray.tune.settings import TuneSettings

if TYPE_CHECKING:
    from deeplense_ray.tune.plan import SearchPlan

__all__ = ["DivergedStopper", "diverged_value", "param_space", "sanitize_result", "train_trial"]


def _sanitizing_report_callback(metric: str, mode: str):
    """A ``TuneReportCallback`` forwarding rank 0's reports through :func:`sanitize_result`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics:
                metrics = [sanitize_result(metrics[0], metric, mode)] + list(metrics[1:])
            super().after_report(run_context, metrics, checkpoint)

    return _Report()


def param_space(settings: TuneSettings, plan: SearchPlan) -> dict[str, Any]:
    """The Tuner's ``param_space``: the search space + ``_search``, what :func:`train_trial` reads."""
    space = dict(plan.space)
    space["_search"] = {
        "train": plan.base_train,
        "hparams": plan.hparams,
        "metric": settings.metric,
        "mode": settings.resolved_mode,
        "trainer_storage": plan.trainer_storage,
        "trial_runner": settings.resolved_trial_runner,
    }
    return space


def make_train_config(config: Mapping[str, Any]):
    """The TrainConfig of one trial: the search's fixed fields + the trial's sampled values."""
    from deeplense_ray.config import TrainConfig
    from deeplense_ray.tune.spaces import trial_train_fields

    fixed = config["_search"]
    return TrainConfig(**trial_train_fields(fixed["train"], config, fixed["hparams"]))


def train_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: one trial = the training loop, in this actor (``trial_runner`` 'actor',
    tune/actor_trial.py) or as one ``TorchTrainer.fit()`` ('trainer').

    ``config`` holds the sampled hyperparameters (flat keys of the search space) and ``config['_search']``:
    the fixed TrainConfig fields ("train"), the model's hyperparameter defaults ("hparams"), "metric", "mode"
    and "trainer_storage" (where each trial's run lives; named by the trial id, so a resumed trial finds its
    own checkpoints), "trial_runner". The trial's checkpoints are kept by "metric" and "mode".
    """
    import ray.tune

    fixed = config["_search"]
    cfg = make_train_config(config)
    trial_id = str(ray.tune.get_context().get_trial_id())
    cfg.storage_path = fixed["trainer_storage"]
    if fixed.get("trial_runner", "trainer") == "actor":
        from deeplense_ray.tune.actor_trial import train_in_actor

        train_in_actor(config, cfg, trial_id)
        return

    from deeplense_ray.train import build_trainer
    from deeplense_ray.tune.cleanup import make_recorder

    trainer = build_trainer(
        cfg,
        run_config_callbacks=[
            _sanitizing_report_callback(fixed["metric"], fixed["mode"]),
            make_recorder(fixed["trainer_storage"], trial_id),
        ],
        run_name=trial_id,
        # keep the trial's best checkpoints by the search's own metric, so the epoch the search names as
        # best still has its checkpoint when the search evaluates it on the test split
        score_metric=fixed["metric"],
        score_mode=fixed["mode"],
    )
    trainer.fit()
