"""Tune pieces that need no Ray runtime: settings validation, search spaces, cluster checks, summaries."""

from __future__ import annotations

import math

import pytest
import torch

from deeplense_ray.models import build_model, list_models, model_hparams
from deeplense_ray.tune.mlflow_runs import numeric_metrics, outcome
from deeplense_ray.tune.report import format_summary
from deeplense_ray.tune.results import TrialSummary, is_better
from deeplense_ray.tune.settings import METRIC_MODES, TuneSettings, check_cluster_resources
from deeplense_ray.tune.spaces import (
    LR_RANGE,
    batch_size_choices,
    model_space,
    search_space,
    split_trial_config,
    width_choices,
)


def _settings(**kw) -> TuneSettings:
    return TuneSettings(**{"model": "ViT", "num_samples": 4, **kw})


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"model": "NoSuchNet"}, "unknown model 'NoSuchNet'"),
        ({"num_samples": 0}, "num_samples=0"),
        ({"metric": "val_top5"}, "unknown metric 'val_top5'"),
        ({"metric": "val_loss", "mode": "max"}, "contradicts"),
        ({"grace_period": 5, "max_epochs": 3}, "grace_period=5"),
        ({"reduction_factor": 1}, "reduction_factor=1"),
        ({"gpus_per_trial": -0.5}, "gpus_per_trial=-0.5"),
        ({"gpus_per_trial": 1.5}, "whole number"),
        ({"search": "grid"}, "unknown search 'grid'"),
        ({"preset": "model_xx"}, "unknown preset 'model_xx'"),
        ({"data_dir": "/nonexistent/dataset"}, "/nonexistent/dataset"),
        ({"train_overrides": {"lr": 1.0}}, "may not set ['lr']"),
        ({"model_size": "huge"}, "model_size='huge'"),
        ({"trial_runner": "process"}, "trial_runner='process'"),
        ({"trial_runner": "actor", "workers_per_trial": 2}, "needs trial_runner='trainer'"),
    ],
)
def test_settings_reject_bad_values_naming_them(kw, needle):
    with pytest.raises(ValueError) as exc:
        _settings(**kw).validate()
    assert needle in str(exc.value)


def test_settings_canonical_model_name_and_natural_mode():
    s = _settings(model="vit", metric="val_loss").validate()
    assert s.model == "ViT" and s.resolved_mode == "min"
    assert _settings().validate().resolved_mode == "max"
    assert set(METRIC_MODES) >= {"val_auc_macro", "val_loss", "val_acc"}


def test_cluster_check_refuses_more_gpus_than_the_cluster_has():
    with pytest.raises(ValueError, match=r"gpus_per_trial=1 .* 0 GPUs"):
        check_cluster_resources(_settings(gpus_per_trial=1.0), {"CPU": 4.0})
    with pytest.raises(ValueError, match=r"2 GPUs per trial, but the Ray cluster has 1 GPUs"):
        check_cluster_resources(_settings(gpus_per_trial=1.0, workers_per_trial=2), {"CPU": 16, "GPU": 1})
    with pytest.raises(ValueError, match="needs 8.1 CPUs .* plus 1 free for its Ray Data readers"):
        check_cluster_resources(_settings(cpus_per_trial=8.0), {"CPU": 4.0})
    # 2 CPUs, 1 per worker: nothing left for the data readers (the trial would hang) -> refused
    with pytest.raises(ValueError, match="has 2 CPUs; lower cpus_per_trial"):
        check_cluster_resources(_settings(cpus_per_trial=1.0), {"CPU": 2.0})


def test_default_cpus_per_trial_leaves_a_cpu_for_the_data_readers():
    from deeplense_ray.tune.settings import resolve_cpus_per_trial

    assert resolve_cpus_per_trial(_settings(), {"CPU": 16.0}) == 1.0
    assert resolve_cpus_per_trial(_settings(), {"CPU": 2.0}) == 0.75
    assert check_cluster_resources(_settings(), {"CPU": 2.0}) == 1


def test_cluster_check_packs_fractional_gpu_trials():
    # 4 trials of 0.25 GPU share one GPU; CPUs (16, 1 kept for the data readers) allow more
    assert check_cluster_resources(_settings(num_samples=10, gpus_per_trial=0.25), {"CPU": 16, "GPU": 1}) == 4
    assert check_cluster_resources(_settings(num_samples=10, gpus_per_trial=1.0), {"CPU": 16, "GPU": 1}) == 1
    # auto: 0.25 GPU per trial when the cluster has GPUs
    assert check_cluster_resources(_settings(num_samples=10), {"CPU": 16, "GPU": 2}) == 8
    # CPU cluster of 4: 1 CPU per worker + 0.1 per driver, 1 CPU left for Ray Data -> 2
    assert check_cluster_resources(_settings(num_samples=10), {"CPU": 4.0}) == 2
    assert check_cluster_resources(_settings(num_samples=10, max_concurrent=1), {"CPU": 4.0}) == 1
    assert check_cluster_resources(_settings(num_samples=1), {"CPU": 64.0}) == 1


def test_lr_range_is_sane_and_log_uniform():
    space = search_space("ViT")
    lo, hi = space["lr"].lower, space["lr"].upper
    assert (lo, hi) == LR_RANGE and 1e-6 <= lo < hi <= 1e-2
    assert type(space["lr"].get_sampler()).__name__ == "_LogUniform"
    assert type(space["weight_decay"].get_sampler()).__name__ == "_LogUniform"


#: Heads keys whose width is not named ``<prefix>dim``, ``<prefix>emb_dim`` or ``<prefix>embedding_dim``.
HEADS_WIDTH = {"sm_enc_heads": "sm_dim", "lg_enc_heads": "lg_dim", "cross_attn_heads": "sm_dim"}


@pytest.mark.parametrize("model", list_models())
def test_every_model_space_keeps_width_divisible_by_its_heads(model):
    """Any (width, heads) draw of one stage is valid: dim % heads == 0 (e.g. ViT dim/heads, CvT s2_*), where
    either is searched (the other at its default); a per-stage heads tuple (Swin) against a width doubling per
    stage. Every heads key of a model must name the width it divides."""
    hp = model_hparams(model)
    space = search_space(model)
    assert set(space) - {"lr", "weight_decay", "batch_size"} <= set(hp)

    def values(key: str) -> list:
        return list(space[key].categories) if hasattr(space.get(key), "categories") else [hp[key]]

    for hk in sorted(k for k in hp if k.endswith("heads")):
        prefix = hk.removesuffix("num_heads").removesuffix("heads")
        widths = [prefix + "dim", prefix + "emb_dim", prefix + "embedding_dim"]
        wk = HEADS_WIDTH.get(hk) or next((w for w in widths if w in hp), None)
        assert wk is not None, f"{model}: no width for {hk} (add it to HEADS_WIDTH)"
        if hk not in space and wk not in space:
            continue  # both fixed: the model's own defaults
        for w in values(wk):
            for h in values(hk):
                hs = h if isinstance(h, tuple) else (h,)
                ws = w if isinstance(w, tuple) else tuple(w * 2**i for i in range(len(hs)))
                assert all(a % b == 0 for a, b in zip(ws, hs, strict=True)), (model, wk, w, hk, h)


def test_widths_are_rounded_to_a_multiple_of_every_head_count_they_pair_with():
    """Widths whose halves and doubles no head choice divides (no model's defaults are such: the test above
    cannot see the rounding): every width drawn is a multiple of every head count of its stage; mlp_dim,
    split by no heads, is not rounded."""
    hp = {"dim": 20, "heads": 4, "s2_emb_dim": 18, "s2_heads": 3, "mlp_dim": 30}
    space = model_space("toy", hp)
    choices = {k: list(space[k].categories) for k in hp}
    assert choices["heads"] == [2, 4, 8] and choices["s2_heads"] == [1, 3, 6]
    assert choices["dim"] == [16, 24, 40]
    assert choices["s2_emb_dim"] == [12, 18, 36]
    assert choices["mlp_dim"] == [15, 30, 60]
    for wk, hk in (("dim", "heads"), ("s2_emb_dim", "s2_heads")):
        assert all(w % h == 0 for w in choices[wk] for h in choices[hk]), (wk, choices[wk], choices[hk])


def test_unknown_space_key_is_refused():
    with pytest.raises(ValueError, match="'patches' is neither an optimiser key"):
        search_space("ViT", overrides={"patches": 4})


@pytest.mark.slow
def test_space_corner_builds_for_every_model():
    """Each model builds and runs at the corner most likely to break it: most heads, least width."""
    for model in list_models():
        space = search_space(model)
        cfg = {}
        for k, dom in space.items():
            if hasattr(dom, "categories"):
                cfg[k] = max(dom.categories) if "heads" in k else min(dom.categories)
            elif hasattr(dom, "upper"):
                cfg[k] = dom.lower
        _, overrides = split_trial_config(cfg, model_hparams(model))
        net = build_model(model, 64, 1, 3, pixel_scale=0.1, **overrides).eval()
        with torch.no_grad():
            assert tuple(net(torch.zeros(1, 1, 64, 64)).shape) == (1, 3), model


def test_width_and_batch_choices():
    assert width_choices(256, 16) == [128, 256, 512]
    assert all(w % 12 == 0 for w in width_choices(64, 12))
    assert batch_size_choices(1) == [32, 64, 128]
    assert all(b % 3 == 0 for b in batch_size_choices(3))


def test_outcome_text_and_metric_filtering():
    assert outcome(10, 10) == ("completed", "FINISHED")
    assert outcome(3, 10) == ("stopped by ASHA at epoch 3", "KILLED")
    m = numeric_metrics(
        {
            "val_loss": 1.0,
            "epoch": 2,
            "done": True,
            "time_total_s": 3.0,
            "x": "a",
            "val_auc_macro": float("nan"),
        }
    )
    assert set(m) == {"val_loss", "epoch", "val_auc_macro"} and math.isnan(m["val_auc_macro"])


def test_summary_table_best_first_and_nan_never_best():
    trials = [
        TrialSummary("a", {"lr": 1e-3}, 2, 0.7, 2, "completed", None),
        TrialSummary("b", {"lr": 1e-2}, 1, 0.9, 1, "stopped by ASHA at epoch 1", None),
        TrialSummary("c", {"lr": 1e-4}, 1, float("nan"), 0, "failed: RuntimeError", None),
    ]
    table = format_summary(trials, "val_auc_macro", "max").splitlines()
    assert table[0].split()[:3] == ["trial", "config", "epochs"]
    assert [line.split()[0] for line in table[2:]] == ["b", "a", "c"]
    assert not is_better(float("nan"), 0.1, "max") and is_better(0.2, float("nan"), "min")


def test_diverged_epoch_reported_as_the_worst_finite_metric_and_stops_the_trial():
    from deeplense_ray.train.metrics import classification_metrics, flatten_metrics
    from deeplense_ray.tune.results import as_metric
    from deeplense_ray.tune.trial import DivergedStopper, diverged_value, sanitize_result

    # what the train loop reports for an epoch whose model outputs NaN
    val = classification_metrics([0, 1, 2], [[float("nan")] * 3] * 3, ["a", "b", "c"])
    report = {"epoch": 2, **flatten_metrics(val, "val"), "diverged": 1}
    for metric, mode in (("val_auc_macro", "max"), ("val_loss", "min"), ("val_acc", "max")):
        r = sanitize_result(report, metric, mode)
        assert r[metric] == diverged_value(mode) and math.isfinite(r[metric]) and r["diverged"] == 1
        assert r["epoch"] == 2 and DivergedStopper()("t1", r)
    assert diverged_value("max") < 0.0 and diverged_value("min") > 1e6  # below any AUC, above any loss
    # a NaN metric without the loop's flag is a divergence too; a finite one passes unchanged
    assert sanitize_result({"val_loss": float("inf")}, "val_loss", "min")["diverged"] == 1
    ok = {"epoch": 1, "val_loss": 0.9, "diverged": 0}
    assert sanitize_result(ok, "val_loss", "min") == ok and not DivergedStopper()("t1", ok)
    # summaries and MLflow see the stand-in value as NaN; the outcome names the epoch
    assert math.isnan(as_metric(diverged_value("max"))) and as_metric(0.75) == 0.75
    assert math.isnan(numeric_metrics({"val_loss": diverged_value("min")})["val_loss"])
    assert outcome(1, 10, diverged_at=1) == ("diverged at epoch 1", "KILLED")


def test_trial_startup_is_read_from_the_first_report_of_an_attempt():
    from deeplense_ray.tune.mlflow_runs import STARTUP_KEY, WORKERS_UP_KEY, trial_startup

    first = {"setup_s": 4.0, "t_epoch_start": 110.0, "first_batch_s": 2.5}
    assert trial_startup(first, 100.0) == {WORKERS_UP_KEY: 6.0, STARTUP_KEY: 12.5}
    assert trial_startup({**first, "setup_s": 0.0}, 100.0) == {}  # a later epoch of the same attempt
    assert trial_startup(first, None) == {}  # a trial whose start this driver did not see


def test_a_local_run_keeps_the_best_and_the_latest_checkpoint_and_resumes_from_the_latest(tmp_path):
    """LocalRunSession.persist (a search trial in its actor, a study run in its task): the num_to_keep best by
    the score metric (NaN last, ties to the earlier epoch) plus the latest stay; an epoch written again
    replaces its checkpoint; no temporary name remains."""
    import json

    from deeplense_ray.train.checkpoint import checkpoint_name
    from deeplense_ray.train.local import LocalRunSession

    run = tmp_path / "trainers" / "abc123"
    session = LocalRunSession(run, metric="val_loss", mode="min", num_to_keep=1)
    assert session.latest() is None

    def epoch_dir(epoch: int, val_loss: float):
        d = tmp_path / f"src{epoch}"
        d.mkdir(exist_ok=True)
        (d / "meta.json").write_text(json.dumps({"epoch": epoch, "metrics": {"val_loss": val_loss}}))
        return d

    kept = lambda: sorted(p.name for p in run.iterdir())  # noqa: E731
    session.persist(epoch_dir(1, 0.9), 1)
    session.persist(epoch_dir(2, 0.5), 2)
    assert kept() == [checkpoint_name(2)]  # epoch 2 is both the best and the latest
    session.persist(epoch_dir(3, math.nan), 3)  # NaN ranks last, but it is the latest
    assert kept() == [checkpoint_name(2), checkpoint_name(3)]
    session.persist(epoch_dir(4, 0.7), 4)
    assert kept() == [checkpoint_name(2), checkpoint_name(4)]
    assert session.latest() == run / checkpoint_name(4)
    session.persist(epoch_dir(4, 0.4), 4)  # epoch 4 again (a restored trial): replaced, and now the best
    assert kept() == [checkpoint_name(4)]
    assert json.loads((run / checkpoint_name(4) / "meta.json").read_text())["metrics"]["val_loss"] == 0.4

    two = LocalRunSession(tmp_path / "two", metric="val_auc_macro", mode="max", num_to_keep=2)
    for e, v in [(1, 0.6), (2, 0.8), (3, 0.7), (4, 0.5)]:
        d = epoch_dir(e, 0.0)
        (d / "meta.json").write_text(json.dumps({"epoch": e, "metrics": {"val_auc_macro": v}}))
        two.persist(d, e)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [checkpoint_name(e) for e in (2, 3, 4)]
    with pytest.raises(RuntimeError, match="trial_runner='trainer'"):
        two.dataset_shard("train")


def test_a_resumed_search_drops_tune_state_a_killed_driver_left_truncated(tmp_path):
    """Tune copies its pickled states into the search directory non-atomically; a driver killed during the
    copy left a truncated callback state and the resume failed with EOFError (seen in this suite). Unreadable
    ones are dropped before Tuner.restore; readable ones and other files are kept."""
    import ray.cloudpickle as cloudpickle

    from deeplense_ray.tune.tuner import drop_unreadable_state

    good = tmp_path / "searcher-state-2026-12-02_19-15-22.pkl"
    good.write_bytes(cloudpickle.dumps({"a": 1}))
    bad = tmp_path / "callback-states-2026-12-02_19-15-22.pkl"
    bad.write_bytes(cloudpickle.dumps({"run_ids": {"t1": "r1"}, "epochs": {}})[:7])
    other = tmp_path / "experiment_state-2026-12-02_19-15-22.json"
    other.write_text("{}")
    assert drop_unreadable_state(str(tmp_path)) == [str(bad)]
    assert good.exists() and other.exists() and not bad.exists()
    assert drop_unreadable_state(str(tmp_path)) == []


def test_a_trial_in_its_actor_reserves_its_cpus_and_gpu_share_there():
    from types import SimpleNamespace

    from deeplense_ray.tune.settings import DRIVER_CPUS
    from deeplense_ray.tune.tuner import trial_resources

    plan = SimpleNamespace(cpus=1.0, gpus=0.25)
    actor = TuneSettings(model="ViT").validate()
    assert trial_resources(actor, plan) == {"cpu": DRIVER_CPUS + 1.0, "gpu": 0.25}
    trainer = TuneSettings(model="ViT", trial_runner="trainer").validate()
    assert trial_resources(trainer, plan) == {"cpu": DRIVER_CPUS}  # the TorchTrainer's workers hold the rest
    two = TuneSettings(model="ViT", workers_per_trial=2).validate()  # auto -> trainer
    assert two.resolved_trial_runner == "trainer" and trial_resources(two, plan) == {"cpu": DRIVER_CPUS}
