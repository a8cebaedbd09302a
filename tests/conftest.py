"""Shared fixtures: one real local Ray runtime per test session (its own temp dir, never a developer's
running cluster), GPU marker handling, and the independent references the physics checks need."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import tempfile

import pytest
import torch

# Ray 2.59+ turns token auth on for clusters started by ray.init(); tests never rely on ~/.ray/auth_token.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The suite's Ray runtimes (this process's and those of the jobs it starts) live in a temp dir of their own:
# the cluster a developer started with `ray start` (recorded under the default /tmp/ray) is never joined,
# and nothing the suite starts is recorded there. A short path: Ray's socket names must stay < 108 bytes.
os.environ.pop("RAY_ADDRESS", None)
SUITE_RAY_TMPDIR = tempfile.mkdtemp(prefix="dlr-t-", dir="/tmp")
os.environ["RAY_TMPDIR"] = SUITE_RAY_TMPDIR

#: Independent references of the physics checks (tests/test_sim_*.py). A missing one fails the session
#: instead of silently skipping every check that needs it, unless ALLOW_MISSING_ENV=1.
REFERENCE_MODULES = ("lenstronomy", "astropy.cosmology", "colossus.cosmology.cosmology", "scipy.stats")
ALLOW_MISSING_ENV = "DEEPLENSE_ALLOW_MISSING_REFERENCES"


def missing_references(modules=REFERENCE_MODULES) -> list[str]:
    """'module: error' for each of ``modules`` that does not import."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure means the reference is unusable
            missing.append(f"{name}: {type(exc).__name__}: {exc}")
    return missing


def pytest_sessionstart(session):
    missing = missing_references()
    if missing and os.environ.get(ALLOW_MISSING_ENV) != "1":
        raise pytest.UsageError(
            "the independent references of the physics checks do not import:\n  " + "\n  ".join(missing)
            + f"\ninstall the dev environment (make install), or set {ALLOW_MISSING_ENV}=1 to run without"
        )


def pytest_unconfigure(config):
    shutil.rmtree(SUITE_RAY_TMPDIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def closed_port():
    """A loopback TCP port where nothing answers for the whole test: bound here and never listening, so a
    connect is refused at once and no other process can start listening there meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray runtime shared by every test that needs one (start-up costs ~10 s on 2 cores): a
    fresh one (``address="local"``) in the suite's own temp dir (RAY_TMPDIR above)."""
    import ray

    for attempt in (1, 2):
        if ray.is_initialized():
            break
        try:
            ray.init(
                address="local",
                num_cpus=4,
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                log_to_driver=False,
                configure_logging=False,
                _temp_dir=SUITE_RAY_TMPDIR,
            )
        except Exception as exc:  # Ray waits 30 s (fixed) for its raylet: on an overloaded machine, once more
            ray.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(ray_session, tmp_path_factory):
    """One tiny model_ii dataset (16x16 pixels, 3 classes; 48 train / 6 val / 6 test rows in shards of 16)
    shared by the training tests that need a dataset but not a particular one."""
    from deeplense_ray.data import DatasetConfig, build_dataset

    out = tmp_path_factory.mktemp("tiny-data") / "model_ii_16"
    cfg = DatasetConfig(
        preset="model_ii", preset_overrides={"num_pix": 16}, num_per_class=20, shard_size=16, seed=5
    )
    build_dataset(cfg, out, progress=False)
    return out


@pytest.fixture
def no_ray(monkeypatch):
    """Any start of or connection to Ray fails the test (the jobs must stop before)."""
    import ray

    import deeplense_ray.runtime

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(deeplense_ray.runtime, "connect", refuse)
    monkeypatch.setattr(deeplense_ray.runtime, "start_local_ray", refuse)
    # The suite's shared runtime may be up from an earlier test: the job must not see it either.
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
