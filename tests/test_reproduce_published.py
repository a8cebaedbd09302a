"""benchmarks/reproduce_published.py in several calls: a run paused after an epoch (``--state-dir``,
``--stop-after``) and continued by the same command trains the same weights as one uninterrupted call (its
history and test metrics equal to the last digit); a paused run refuses other settings, naming them.

Real training on the real simulator, at the ``--quick`` size (CPU, ~40 s)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_published  # noqa: E402

QUICK = ["--quick", "--presets", "deeplense_model_ii", "--epochs", "3"]


def _run(out: Path, *extra: str) -> dict:
    assert reproduce_published.main([*QUICK, *extra, "--out", str(out)]) == 0
    return json.loads(out.read_text())["runs"][0]


def test_a_paused_run_continues_to_the_same_result(tmp_path):
    whole = _run(tmp_path / "whole.json")
    state = tmp_path / "state"
    pause = ("--state-dir", str(state), "--stop-after", "0.001")  # pauses after each epoch of a call
    first = _run(tmp_path / "parts.json", *pause)
    assert first["status"] == "paused after epoch 1" and len(first["history"]) == 1
    assert (state / "CvT_deeplense_model_ii_s0.pt").is_file()

    with pytest.raises(SystemExit, match=r"other settings \{'image_size': \(48, 40\)\}"):
        _run(tmp_path / "other.json", *pause, "--image-size", "40")

    assert _run(tmp_path / "parts.json", *pause)["status"] == "paused after epoch 2"
    last = _run(tmp_path / "parts.json", *pause)
    assert last["status"] == "ok" and not list(state.iterdir())  # done: no state left to continue from
    assert [h["loss"] for h in last["history"]] == [h["loss"] for h in whole["history"]]
    assert last["confusion_matrix"] == whole["confusion_matrix"]
    assert last["test_auc"] == whole["test_auc"] and last["test_accuracy"] == whole["test_accuracy"]


def test_stop_after_needs_a_state_dir(capsys):
    with pytest.raises(SystemExit):
        reproduce_published.parse_args([*QUICK, "--stop-after", "60"])
    assert "--stop-after needs --state-dir" in capsys.readouterr().err
