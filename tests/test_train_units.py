"""Pieces of the training stack that need no Ray: schedule, options, checkpoint round trip, one epoch."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deeplense_ray.config import TrainConfig, parse_override
from deeplense_ray.train.checkpoint import load_model_from_checkpoint, load_training_state, save_checkpoint
from deeplense_ray.train.modules import build_classifier
from deeplense_ray.train.optim import build_optimizer, build_scheduler, lr_factor
from deeplense_ray.train.seeding import derive_seed
from deeplense_ray.train.steps import predict_batches, train_one_epoch

ARCH = {
    "model": "ResNetSimple",
    "model_size": "default",
    "model_overrides": {"width": 4},
    "image_shape": [1, 16, 16],
    "class_names": ["no_sub", "cdm"],
    "pixel_scale": 0.1,
    "normalize": "per_image_standard",
}


def test_lr_factor_schedules():
    kw = {"epochs": 6, "warmup_epochs": 2}
    assert [lr_factor(e, scheduler="none", **kw) for e in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1, 1, 1, 1]
    )
    cos = [lr_factor(e, scheduler="cosine", **kw) for e in range(2, 6)]
    assert cos == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])
    step = [lr_factor(e, epochs=9, scheduler="step", step_gamma=0.5) for e in range(9)]
    assert step == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25])
    with pytest.raises(ValueError, match="scheduler"):
        lr_factor(0, epochs=2, scheduler="linear")


def test_scheduler_follows_lr_factor():
    p = torch.nn.Parameter(torch.zeros(1))
    conf = {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "epochs": 4,
            "warmup_epochs": 1, "scheduler": "cosine"}  # fmt: skip
    opt = build_optimizer([p], conf)
    sched = build_scheduler(opt, conf)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen == pytest.approx([0.1 * lr_factor(e, epochs=4, warmup_epochs=1) for e in range(4)])


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("epochs", 0, "epochs must be an integer >= 1"),
        ("batch_size", 7, "divisible by num_workers=2"),
        ("optimizer", "lamb", "optimizer must be one of"),
        ("precision", "fp8", "precision must be one of"),
        ("lr", -1.0, "lr must be a positive"),
        ("warmup_epochs", 5, "warmup_epochs=5 must be < epochs=5"),
        ("gpus_per_worker", 1.5, "whole number"),
        ("run_name", "a/b", "plain directory name"),
        ("normalize", "zscore", "normalize must be one of"),
    ],
)
def test_bad_options_name_the_value(field, value, match):
    cfg = TrainConfig(model="ViT", data_dir="x", epochs=5, batch_size=8, num_workers=2)
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate_options()


def test_config_round_trip_and_overrides(tmp_path):
    cfg = TrainConfig(model="vit", data_dir="d", model_overrides={"depth": 2})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr_max": 1})
    r = cfg.resolved(base_dir=tmp_path)
    assert r.model == "ViT" and r.data_dir == str(tmp_path.resolve() / "d")
    assert r.storage_path == str(tmp_path.resolve() / "ray_results")
    assert r.tracking_uri.startswith("sqlite:////") or r.tracking_uri.startswith("http")
    assert parse_override("depth=2") == ("depth", 2)
    assert parse_override("dropout=0.1") == ("dropout", 0.1)
    assert parse_override("pool=mean") == ("pool", "mean")
    assert parse_override("depths=[2, 2]") == ("depths", (2, 2))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_override("depth")


def test_derive_seed_streams_differ():
    # Pinned: a change here silently changes every seeded stream (training order, online images, augment).
    assert derive_seed(0, 1, 0) == 2918264622725855778
    assert len({derive_seed(0, e, r) for e in range(5) for r in range(3)}) == 15
    assert 0 <= derive_seed(2**63 - 1, 7) < 2**63


@pytest.fixture
def one_thread():
    """One intra-op thread: on a busy 2-core box, 2 OpenMP threads made this tiny model 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_epoch_learns_and_checkpoint_round_trips(tmp_path, one_thread):
    torch.manual_seed(0)
    model = build_classifier(ARCH)
    # a separable toy problem on real model code: class 1 has a bright centre
    x = torch.randn(32, 1, 16, 16)
    y = torch.arange(32) % 2
    x[y == 1, :, 6:10, 6:10] += 3.0
    batches = [{"image": x[i : i + 8], "label": y[i : i + 8]} for i in range(0, 32, 8)]
    conf = {"optimizer": "adamw", "lr": 3e-3, "weight_decay": 0.0, "epochs": 30, "warmup_epochs": 0,
            "scheduler": "none", "seed": 0}  # fmt: skip
    opt = build_optimizer(model.parameters(), conf)
    sched = build_scheduler(opt, conf)
    gen = torch.Generator().manual_seed(1)
    aug = {"rot90": True, "flip": True}
    first = train_one_epoch(model, batches, opt, device=torch.device("cpu"), augment=aug, generator=gen)
    for _ in range(9):
        last = train_one_epoch(model, batches, opt, device=torch.device("cpu"), augment=aug, generator=gen)
        sched.step()
    assert first["images"] == 32 and first["seconds"] > 0
    assert last["loss_sum"] < 0.5 * first["loss_sum"]
    assert last["correct"] / 32 > 0.9

    save_checkpoint(
        tmp_path,
        model=model,
        optimizer=opt,
        scheduler=sched,
        scaler=None,
        epoch=10,
        config={**ARCH, "seed": 0},
        metrics={"val_auc_macro": float("nan")},
        history=[{"epoch": 1}],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json", "model.pt", "train_state.pt"]
    state = load_training_state(tmp_path)
    assert state["epoch"] == 10 and state["history"] == [{"epoch": 1}]
    assert state["optimizer"]["state"][0]["step"].item() == 10 * 4
    assert state["scheduler"]["last_epoch"] == 9
    reloaded = load_model_from_checkpoint(tmp_path)
    model.eval()
    a, _ = predict_batches(model, batches, device=torch.device("cpu"))
    b, labels = predict_batches(reloaded, batches, device=torch.device("cpu"))
    assert torch.equal(torch.from_numpy(a), torch.from_numpy(b))
    assert labels.tolist() == y.tolist()
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        load_model_from_checkpoint(tmp_path / "nope")


@pytest.mark.parametrize("rows", [[5, 1], [4096, 4096, 17], [3, 9, 2, 7, 7, 1], [10]])
def test_val_shards_dealt_to_ranks_give_every_row_once_in_shard_order(rows):
    """Any number of ranks: each shard goes to one rank, and the gathered predictions, in whatever rank
    order they arrive, are the single-process predictions of the split in shard order."""
    from deeplense_ray.train.ingest import deal_shards
    from deeplense_ray.train.validation import merge_shard_predictions

    rng = np.random.default_rng(0)
    logits = [rng.normal(size=(n, 3)).astype(np.float32) for n in rows]
    labels = [rng.integers(0, 3, n) for n in rows]
    for world in range(1, 6):
        mine = [deal_shards(rows, r, world) for r in range(world)]
        assert sorted(i for m in mine for i in m) == list(range(len(rows)))
        if world <= len(rows):  # greedy by size: no rank holds more than the fair share plus one shard
            assert max(sum(rows[i] for i in m) for m in mine) <= sum(rows) / world + max(rows)
        parts = [{i: (logits[i], labels[i]) for i in m} for m in mine]
        x, y = merge_shard_predictions(parts[::-1], rows)
        assert np.array_equal(x, np.concatenate(logits)) and np.array_equal(y, np.concatenate(labels))
    with pytest.raises(RuntimeError, match="evaluated by two ranks"):
        merge_shard_predictions([{0: (logits[0], labels[0])}, {0: (logits[0], labels[0])}], rows)
    if len(rows) > 1:
        with pytest.raises(RuntimeError, match=r"shards \[1.*\] missing"):
            merge_shard_predictions([{0: (logits[0], labels[0])}], rows)
    with pytest.raises(RuntimeError, match="fewer or more rows"):
        merge_shard_predictions([{i: (logits[i][:1], labels[i][:1]) for i in range(len(rows))}], rows)


def test_a_diverging_epoch_gives_flagged_metrics_not_an_error(one_thread):
    """An absurd learning rate blows the real model up: the epoch, the prediction and the metrics of the
    loop's chain still run and say 'diverged' (tune ranks such a trial worst; it must not crash)."""
    from deeplense_ray.train.metrics import classification_metrics, flatten_metrics
    from deeplense_ray.train.steps import probabilities

    torch.manual_seed(0)
    model = build_classifier(ARCH)
    x = torch.randn(16, 1, 16, 16)
    y = torch.arange(16) % 2
    batches = [{"image": x[i : i + 8], "label": y[i : i + 8]} for i in range(0, 16, 8)]
    conf = {"optimizer": "sgd", "lr": 1e30, "weight_decay": 0.0, "momentum": 0.9}
    opt = build_optimizer(model.parameters(), conf)
    for _ in range(3):
        sums = train_one_epoch(model, batches, opt, device=torch.device("cpu"))
    logits, labels = predict_batches(model, batches, device=torch.device("cpu"))
    assert not math.isfinite(sums["loss_sum"]) or not torch.isfinite(torch.from_numpy(logits)).all()
    m = classification_metrics(labels, probabilities(logits), ARCH["class_names"])
    assert m["diverged"] == 1 and math.isnan(m["auc_macro"]) and 0.0 <= m["accuracy"] <= 1.0
    assert flatten_metrics(m, "val")["val_diverged"] == 1.0


def test_compiled_model_trains_and_checkpoints_plain_names(tmp_path):
    """compile=True: torch.compile (inductor) in place; the checkpoint has the uncompiled parameter names and
    reloads into a plain model that predicts the same; unwrap sees through a torch.compile wrapper too.

    Runs with the default thread count, not ``one_thread``: on an AMD EPYC without AVX-512, torch 2.13's CPU
    inductor backward of this ResNetSimple corrupts the heap with one intra-op thread ("free(): invalid
    pointer", the process aborts) and runs correctly with two."""
    from deeplense_ray.train.modules import compile_model, unwrap

    torch.manual_seed(0)
    plain_keys = list(build_classifier(ARCH).state_dict())
    model = compile_model(build_classifier(ARCH))
    x, y = torch.randn(16, 1, 16, 16), torch.arange(16) % 2
    batches = [{"image": x[i : i + 8], "label": y[i : i + 8]} for i in (0, 8)]
    conf = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "epochs": 1, "warmup_epochs": 0,
            "scheduler": "none"}  # fmt: skip
    opt = build_optimizer(model.parameters(), conf)
    sums = train_one_epoch(model, batches, opt, device=torch.device("cpu"))
    assert sums["images"] == 16 and 0 < sums["first_step_s"] <= sums["seconds"]
    assert model._compiled_call_impl is not None  # really compiled, not silently eager
    sched = build_scheduler(opt, conf)
    save_checkpoint(tmp_path, model=unwrap(model), optimizer=opt, scheduler=sched, scaler=None, epoch=1,
                    config={**ARCH, "seed": 0}, metrics={}, history=[])  # fmt: skip
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(saved) == plain_keys and not any("_orig_mod" in k for k in saved)
    a, _ = predict_batches(model, batches, device=torch.device("cpu"))
    b, _ = predict_batches(load_model_from_checkpoint(tmp_path), batches, device=torch.device("cpu"))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    wrapped = torch.compile(build_classifier(ARCH))
    assert list(wrapped.state_dict())[0].startswith("_orig_mod.")
    assert list(unwrap(wrapped).state_dict()) == plain_keys


# ------------------------------------------------------------------------------------------ precise BatchNorm
def _conv_bn(dropout: float = 0.0) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Dropout(dropout), torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2),
    )  # fmt: skip


def test_recalibrate_batch_norm_gives_the_plain_average_of_batch_statistics(one_thread):
    """Independent reference: the conv outputs' per-batch channel mean and unbiased variance, averaged over
    the batches. The dropout in front stays off (else the statistics would be of dropped inputs), the
    momentum is restored, and the model is left in eval mode."""
    from deeplense_ray.train.batchnorm import recalibrate_batch_norm

    model = _conv_bn(dropout=0.5)
    bn = model[2]
    bn.running_mean.fill_(50.0)  # stale statistics
    bn.running_var.fill_(1e-4)
    g = torch.Generator().manual_seed(1)
    inputs = [3.0 + 2.0 * torch.randn(n, 1, 12, 12, generator=g) for n in (8, 8, 5)]
    assert recalibrate_batch_norm(model, inputs, device=torch.device("cpu")) == 1
    with torch.no_grad():
        feats = [model[1](x) for x in inputs]  # [B, 4, 10, 10]
    mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not model.training and not bn.training and not model[0].training


def test_recalibration_removes_the_eval_mode_shift_of_stale_statistics(one_thread):
    """With stale running statistics eval-mode outputs differ from what training saw; after recalibration on
    the same inputs, eval mode reproduces the train-mode (batch statistics) outputs."""
    from deeplense_ray.train.batchnorm import recalibrate_batch_norm

    model = _conv_bn()
    x = 5.0 + 0.01 * torch.randn(256, 1, 12, 12, generator=torch.Generator().manual_seed(2))  # near-identical
    model.train()
    with torch.no_grad():
        want = model(x)  # batch statistics, as in a training step (this also updates the running averages)
    model.eval()
    with torch.no_grad():
        stale = model(x)
    assert (stale - want).abs().max() > 0.5  # running averages after one step lag badly (0.82 here)
    recalibrate_batch_norm(model, [x], device=torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-3, atol=1e-3)


def test_recent_batches_keeps_the_last_images():
    from deeplense_ray.train.batchnorm import RecentBatches

    keep = RecentBatches(10)
    batches = [torch.full((4, 1, 2, 2), float(i)) for i in range(5)]
    for b in batches:
        keep.add(b)
    assert [int(b[0, 0, 0, 0]) for b in keep] == [2, 3, 4] and keep.images == 12  # >= 10, fewest batches
    keep.clear()
    assert len(keep) == 0 and keep.images == 0
    off = RecentBatches(0)
    off.add(batches[0])
    assert len(off) == 0


def test_recalibration_of_a_compiled_model_runs_eagerly_and_matches(one_thread):
    from deeplense_ray.train.batchnorm import recalibrate_batch_norm
    from deeplense_ray.train.modules import compile_model

    inputs = [torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    plain, compiled = _conv_bn(), compile_model(_conv_bn(), backend="eager")
    for m in (plain, compiled):
        recalibrate_batch_norm(m, inputs, device=torch.device("cpu"))
    torch.testing.assert_close(compiled[2].running_mean, plain[2].running_mean)
    torch.testing.assert_close(compiled[2].running_var, plain[2].running_var)
    assert compiled._compiled_call_impl is not None
