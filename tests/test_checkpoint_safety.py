"""Training state is saved as plain data and read back with ``torch.load(weights_only=True)``: a checkpoint
directory never runs code when it is loaded (checkpoints travel between machines and users)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeplense_ray.train.checkpoint import STATE_FILE, load_training_state, save_checkpoint
from deeplense_ray.train.optim import build_optimizer, build_scheduler

_CONFIG = {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "momentum": 0.9, "epochs": 3,
           "warmup_epochs": 1, "scheduler": "cosine", "seed": 7}


def _save(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model.parameters(), _CONFIG)
    sched = build_scheduler(opt, _CONFIG)
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    sched.step()
    # metrics as the loop computes them: sklearn / numpy scalars are float subclasses
    history = [{"epoch": 1, "val_auc_macro": np.float64(0.75), "val_loss": 0.5}]
    save_checkpoint(tmp_path, model=model, optimizer=opt, scheduler=sched, scaler=None, epoch=1,
                    config=_CONFIG, metrics={"val_auc_macro": np.float64(0.75)}, history=history)
    return model, opt, sched


def test_training_state_round_trips_through_weights_only_loading(tmp_path):
    model, opt, sched = _save(tmp_path)
    raw = torch.load(tmp_path / STATE_FILE, weights_only=True)  # plain data only
    assert raw["history"] == [{"epoch": 1, "val_auc_macro": 0.75, "val_loss": 0.5}]
    assert type(raw["history"][0]["val_auc_macro"]) is float
    state = load_training_state(tmp_path)
    assert state["epoch"] == 1 and state["seed"] == 7
    opt2 = build_optimizer(torch.nn.Linear(3, 2).parameters(), _CONFIG)
    opt2.load_state_dict(state["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    sched2 = build_scheduler(opt2, _CONFIG)
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == sched.last_epoch
    assert torch.equal(state["model"]["weight"], model.state_dict()["weight"])


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_state_file_holding_code_is_refused_without_running_it(tmp_path):
    _save(tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "history": [], "evil": _Payload(marker)}, tmp_path / STATE_FILE)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported global"):
        load_training_state(tmp_path)
    assert not marker.exists()
