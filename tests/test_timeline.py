"""train/timeline.py: the job's phases from driver marks and rank 0's per-epoch history."""

from __future__ import annotations

import pytest

from deeplense_ray.train.timeline import Timeline


def test_timeline_sums_this_jobs_epochs_and_orders_the_phases():
    tl = Timeline(start=1000.0)
    tl.mark("ray connected", 1005.0)
    tl.mark("fit start", 1006.0)
    history = [  # epoch 1 ran in an earlier job (resumed run): left out
        {"epoch": 1, "t_epoch_start": 900.0, "setup_s": 3.0, "train_seconds": 50.0, "val_seconds": 5.0},
        {"epoch": 2, "t_epoch_start": 1010.0, "setup_s": 3.0, "first_batch_s": 1.5, "train_seconds": 4.0,
         "val_seconds": 2.0, "compile_s": 1.0},
        {"epoch": 3, "t_epoch_start": 1017.0, "setup_s": 0.0, "train_seconds": 3.0, "val_seconds": 0.5},
        {"epoch": 4, "t_epoch_start": 1021.0, "setup_s": 0.0, "train_seconds": 3.0, "val_seconds": 0.5},
    ]  # fmt: skip
    assert [h["epoch"] for h in tl.add_epochs(history)] == [2, 3, 4]
    tl.mark("fit end", 1025.0)
    tl.mark("end", 1030.0)
    s = tl.summary()
    assert s["wall_s"] == 30.0 and s["epochs"] == 3 and s["compile_s"] == 1.0
    assert s["train_s"] == 10.0 and s["val_s"] == 3.0 and s["overhead_s"] == pytest.approx(17.0)
    phases = [p["phase"] for p in s["phases"]]
    assert phases[:6] == ["start", "ray connected", "fit start", "workers_up", "epoch 2 start", "first_batch"]
    assert phases[-3:] == ["epoch 4 val end", "fit end", "end"]
    at = {p["phase"]: p["at_s"] for p in s["phases"]}
    assert at["workers_up"] == 7.0 and at["first_batch"] == 11.5 and at["epoch 4 val end"] == 24.5
    line = tl.line()
    assert line.startswith("timeline: wall 30.0 s = train 10.0 + val 3.0 + overhead 17.0 s | ")
    assert "| ray connected +5.0, fit start +1.0, workers_up +1.0, epoch 2 start +3.0" in line
    assert "epoch 3" not in line and "epoch 4 val end +" in line and line.endswith("end +5.0")
