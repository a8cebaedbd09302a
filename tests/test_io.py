"""deeplense_ray.io: the one atomic-write helper every writer uses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from deeplense_ray.io import TMP_MARK, atomic_path, atomic_write_json, atomic_write_text, remove_stale_tmp


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError, match="crash"), atomic_path(target) as tmp:
        tmp.write_text("half")
        assert TMP_MARK in tmp.name and tmp.parent == target.parent and tmp.name.startswith(".")
        raise RuntimeError("crash")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]
    atomic_write_json(target, {"b": np.float64(math.inf), "a": np.arange(3, dtype=np.int32)}, fsync=True)
    assert json.loads(target.read_text()) == {"a": [0, 1, 2], "b": None}
    (tmp_path / f".x{TMP_MARK}dead").write_text("left by a killed writer")
    assert [p.name for p in remove_stale_tmp(tmp_path)] == [f".x{TMP_MARK}dead"]
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["state.json", "sub"]
