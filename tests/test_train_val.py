"""Validation on several Ray Train workers and checkpoint selection by a search's metric (real Ray Train on
CPU, real HDF5 data, the shared Ray runtime of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deeplense_ray.config import TrainConfig
from deeplense_ray.data import DatasetConfig, build_dataset, load_manifest
from deeplense_ray.train import build_trainer, evaluate_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uneven_data(ray_session, tmp_path_factory) -> Path:
    """model_ii at 16x16, 20 images per class in shards of 5 rows: val holds 6 rows in shards of 5 and 1."""
    out = tmp_path_factory.mktemp("val-data") / "uneven"
    cfg = DatasetConfig(
        preset="model_ii", preset_overrides={"num_pix": 16}, num_per_class=20, shard_size=5, seed=11
    )
    build_dataset(cfg, out, progress=False, preview=False)
    return out


def test_two_workers_evaluate_every_val_row_once(uneven_data, tmp_path):
    """2 workers, val shards of 5 and 1 rows, batches of 2: the reported val metrics equal a single-process
    evaluation of the same weights (each row counted once, whichever rank reads it, in any block order)."""
    assert [s["rows"] for s in load_manifest(uneven_data)["splits"]["val"]["shards"]] == [5, 1]
    cfg = TrainConfig(
        model="ResNetSimple",
        data_dir=str(uneven_data),
        epochs=2,
        batch_size=8,
        lr=3e-3,
        num_workers=2,
        model_overrides={"width": 8},
        storage_path=str(tmp_path / "ray"),
        run_name="val2",
        shuffle_buffer=0,
    )
    result = build_trainer(cfg, extra_loop_config={"val_cache_mb": 0, "eval_batch_size": 2}).fit()
    assert result.error is None
    reported = result.metrics
    assert reported["epoch"] == 2 and reported["val_n"] == 6
    single = evaluate_checkpoint(result.checkpoint, uneven_data, "val", device="cpu")
    assert single["n"] == 6
    assert reported["val_acc"] == pytest.approx(single["accuracy"])
    assert reported["val_loss"] == pytest.approx(single["loss"], rel=1e-6)
    assert reported["val_auc_macro"] == pytest.approx(single["auc_macro"], abs=1e-9)
    for name, auc in single["auc"].items():
        assert reported[f"val_auc_{name}"] == pytest.approx(auc, abs=1e-9)


#: (val_auc_macro, val_loss) per epoch: the best AUC (epoch 1) and the lowest loss (epoch 3) differ.
SCRIPT = [(0.90, 1.00), (0.60, 0.80), (0.70, 0.10), (0.50, 0.90)]


def test_checkpoints_are_kept_and_chosen_by_the_searched_metric(ray_session, tmp_path):
    """A search that optimises val_loss keeps (num_to_keep=1) and picks the lowest-loss epoch's checkpoint,
    not the best-AUC one; Ray Train's own checkpoint manager does the keeping."""
    import json

    metric, mode, best = "val_loss", "min", 3
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from deeplense_ray.train.trainer import best_checkpoint, checkpoint_config

    script = list(SCRIPT)

    def scripted_loop(config):  # defined here so that Ray pickles it by value
        """Reports ``script``'s metrics with a real checkpoint per epoch, as the training loop does."""
        import tempfile

        import ray.train

        for epoch, (auc, loss) in enumerate(script, start=1):
            with tempfile.TemporaryDirectory() as tmp:
                Path(tmp, "epoch.json").write_text(json.dumps(epoch))
                ray.train.report(
                    {"epoch": epoch, "val_auc_macro": auc, "val_loss": loss},
                    checkpoint=ray.train.Checkpoint.from_directory(tmp),
                )

    trainer = TorchTrainer(
        scripted_loop,
        scaling_config=ScalingConfig(num_workers=1),
        run_config=RunConfig(
            name=f"kept-{metric}",
            storage_path=str(tmp_path),
            checkpoint_config=checkpoint_config(1, metric, mode),
        ),
    )
    result = trainer.fit()
    assert result.error is None

    def epoch_of(ckpt):
        with ckpt.as_directory() as d:
            return json.loads(Path(d, "epoch.json").read_text())

    assert [epoch_of(c) for c, _ in result.best_checkpoints] == [best]
    on_disk = sorted(
        json.loads(p.read_text()) for p in (tmp_path / f"kept-{metric}").glob("checkpoint_*/epoch.json")
    )
    assert on_disk == sorted({best, len(SCRIPT)})  # the best by the metric, and the latest (for resume)
    ckpt, metrics = best_checkpoint(result, metric, mode)
    assert epoch_of(ckpt) == best and metrics["epoch"] == best
