"""Several workers equal one: a 2-rank DDP Ray Train run on CPU (gloo) trains the same model as a 1-rank run
with the same global batch and seed (``ingest="memory"``: step i's global batch is the same rows whatever the
number of ranks; no augmentation, dropout or BatchNorm, whose randomness or statistics are per rank by
design), and a search with ``workers_per_trial=2`` runs a trial end to end. Real Ray runtime, HDF5 data,
SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deeplense_ray.config import TrainConfig
from deeplense_ray.train import run_training
from deeplense_ray.train.checkpoint import load_training_state

pytestmark = pytest.mark.slow

TINY_VIT = {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 32, "dropout": 0.0, "emb_dropout": 0.0}


def _cfg(tmp: Path, data: Path, workers: int) -> TrainConfig:
    return TrainConfig(
        model="ViT", model_overrides=dict(TINY_VIT), data_dir=str(data), epochs=2, batch_size=8, lr=3e-3,
        num_workers=workers, cpus_per_worker=1, seed=3, augment=False, ingest="memory", precision="fp32",
        tracking_uri=f"sqlite:///{tmp}/mlflow.db", storage_path=str(tmp / "ray"), experiment="ddp",
        run_name=f"w{workers}",
    )  # fmt: skip


def _final_weights(run_dir: str) -> dict[str, torch.Tensor]:
    states = [load_training_state(p) for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()]
    return max(states, key=lambda s: int(s["epoch"]))["model"]


def test_two_ranks_train_the_model_one_rank_trains(tiny_dataset, tmp_path):
    one = run_training(_cfg(tmp_path, tiny_dataset, 1), runner="task")
    two = run_training(_cfg(tmp_path, tiny_dataset, 2), runner="trainer")
    a, b = _final_weights(one.run_dir), _final_weights(two.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
    # counts exactly, losses and scores to float tolerance (a different summation order over 2 ranks)
    for h1, h2 in zip(one.history, two.history, strict=True):
        for key in ("epoch", "train_images", "val_n", "train_acc", "val_acc", "diverged"):
            assert h2[key] == h1[key], (key, h1[key], h2[key])
        for key in ("train_loss", "val_loss", "val_auc_macro", "val_auc_micro", "lr"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-6), key
    assert [h["train_images"] for h in two.history] == [48, 48]
    assert two.test_metrics["confusion_matrix"] == one.test_metrics["confusion_matrix"]
    assert two.test_metrics["n"] == one.test_metrics["n"] == 6
    assert two.test_metrics["loss"] == pytest.approx(one.test_metrics["loss"], rel=1e-4)


def test_a_search_with_two_workers_per_trial_runs_a_trial_end_to_end(tiny_dataset, tmp_path):
    from mlflow.tracking import MlflowClient

    from deeplense_ray.tune import TuneSettings, run_search

    settings = TuneSettings(
        model="ViT", data_dir=str(tiny_dataset), num_samples=1, max_epochs=2, workers_per_trial=2,
        cpus_per_trial=1, max_concurrent=1, metric="val_loss", seed=3, experiment="ddp-tune", name="two",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", storage_path=str(tmp_path / "tune"),
        space={**TINY_VIT, "batch_size": 8, "lr": 3e-3},
        train_overrides={"precision": "fp32", "augment": False},
    )  # fmt: skip
    res = run_search(settings)
    [trial] = res.trials
    assert trial.outcome == "completed" and trial.epochs_run == 2, trial
    assert res.best_trial_id == trial.trial_id and res.best_epoch in (1, 2)
    assert res.test_metrics["n"] == 6 and Path(res.best_checkpoint).is_dir()
    client = MlflowClient(tracking_uri=res.tracking_uri)
    assert res.best_config["train_config"]["num_workers"] == 2
    assert sorted(m.step for m in client.get_metric_history(trial.child_run_id, "val_loss")) == [1, 2]

    # jobs/tune.py --register, then predict from the registry on two splits of the dataset
    import pandas as pd

    from deeplense_ray.data.manifest import load_manifest, shard_paths
    from deeplense_ray.infer.predict import run_prediction
    from deeplense_ray.tracking.models import register_model

    assert register_model(res.model_uri, "ddp-best", res.tracking_uri, alias="champion") == "1"
    pred = run_prediction(
        "models:/ddp-best@champion", tiny_dataset, tmp_path / "p.csv", tracking_uri=res.tracking_uri,
        splits=["val", "test"], progress=False, log_mlflow=False,
    )  # fmt: skip
    table = pd.read_csv(tmp_path / "p.csv")
    assert pred.labelled and pred.num_images == len(table) == 12
    manifest = load_manifest(tiny_dataset)
    shards = {str(p) for split in ("val", "test") for p in shard_paths(tiny_dataset, split, manifest)}
    assert {str(Path(p).resolve()) for p in table["source"]} == {str(Path(p).resolve()) for p in shards}
