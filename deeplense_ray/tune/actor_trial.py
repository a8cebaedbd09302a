"""A trial that trains in its own Tune actor (``trial_runner='actor'``, the default with one worker/trial).

The trial's function runs the training loop itself, in the Tune actor that holds the trial's CPUs and GPU
share (train/local.py), and Tune reuses that actor for the next trial (``reuse_actors``): after the first
trial no process is started. Each epoch's checkpoint goes to ``<trainer_storage>/<trial_id>/`` as in a
one-worker Ray Train run, and the report to Tune carries ``checkpoint_path`` (tune/best.py) and passes
through :func:`~deeplense_ray.tune.diverged.sanitize_result`, as the ``TuneReportCallback`` of a trainer does:
what the search does with trials (ASHA, MLflow child runs, disk pruning, the best checkpoint's test) is the
same for both runners. A stopped trial ends at its next report (Tune's function API).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deeplense_ray.train.checkpoint import checkpoint_name
from deeplense_ray.train.local import LocalRunSession, fit_here, local_loop_config
from deeplense_ray.tune.best import CHECKPOINT_PATH_KEY
from deeplense_ray.tune.diverged import sanitize_result


class ActorTrialSession(LocalRunSession):
    """:class:`LocalRunSession` whose reports go to Tune, with the checkpoint's path."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        import ray.tune

        out = dict(metrics)
        epoch = int(metrics["epoch"])
        if checkpoint_dir is not None:
            out[CHECKPOINT_PATH_KEY] = str(self.persist(checkpoint_dir, epoch))
        elif (self.run_dir / checkpoint_name(epoch)).is_dir():  # a restored trial's last epoch, again
            out[CHECKPOINT_PATH_KEY] = str(self.run_dir / checkpoint_name(epoch))
        self.last_metrics = dict(metrics)
        ray.tune.report(sanitize_result(out, self.metric, self.mode))


def train_in_actor(config: dict[str, Any], cfg, trial_id: str) -> None:
    """Train trial ``trial_id`` (TrainConfig ``cfg``) here, in its Tune actor; ``config['_search']`` as in
    :func:`deeplense_ray.tune.trial.train_trial`."""
    import gc

    import torch

    # the last trial's model, optimizer and data are garbage now, but a stopped trial's frames can sit in a
    # reference cycle (its exit exception's traceback) until the collector runs: free them before this one
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    fixed = config["_search"]
    cfg = cfg.resolved()
    session = ActorTrialSession(
        Path(fixed["trainer_storage"]) / trial_id,
        metric=fixed["metric"],
        mode=fixed["mode"],
        num_to_keep=cfg.num_to_keep,
    )
    fit_here(session, local_loop_config(cfg, cfg.validate()))
