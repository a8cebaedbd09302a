"""The suite itself: a missing physics reference stops the session (never a silent skip of every independent
check), and the suite's Ray runtime lives in its own temp dir (a developer's running cluster is never
joined)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ALLOW_MISSING_ENV, SUITE_RAY_TMPDIR

REPO = Path(__file__).resolve().parents[1]


def _collect(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """``pytest --collect-only`` of one light module with a ``colossus`` that fails to import."""
    fake = tmp_path / "fake" / "colossus"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('colossus broken for this test')\n")
    base = {k: v for k, v in os.environ.items() if k != ALLOW_MISSING_ENV}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "tests/test_io.py"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**base, "PYTHONPATH": str(fake.parent), **env},
    )  # fmt: skip


def test_a_missing_physics_reference_fails_the_session(tmp_path):
    res = _collect(tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-2000:]
    assert "colossus.cosmology.cosmology: ImportError: colossus broken for this test" in out, out[-2000:]
    assert f"{ALLOW_MISSING_ENV}=1" in out
    allowed = _collect(tmp_path, **{ALLOW_MISSING_ENV: "1"})
    assert allowed.returncode == 0, (allowed.stdout + allowed.stderr)[-2000:]


def test_the_suite_runtime_has_its_own_temp_dir(ray_session):
    import ray

    session_dir = ray._private.worker._global_node.get_session_dir_path()
    assert session_dir.startswith(SUITE_RAY_TMPDIR + os.sep), session_dir
    assert os.environ["RAY_TMPDIR"] == SUITE_RAY_TMPDIR and "RAY_ADDRESS" not in os.environ
    # what `ray start` records (and a job's default address reads) is looked up under the suite's dir
    from deeplense_ray.runtime import recorded_cluster_file

    assert str(recorded_cluster_file()).startswith(SUITE_RAY_TMPDIR + os.sep)
