"""The MLflow UI: `mlflow server` on 127.0.0.1 over a store that the real demo job (simulate + tune + test
evaluation, `jobs/demo.py --quick`) wrote, read through its REST API, plus a headless Chromium screenshot; and
over a tiny search store logged through MLflow's client, the screenshot of scripts/screenshot_mlflow.py taken
through the Chrome DevTools Protocol (assistant panel closed, child runs expanded)."""

from __future__ import annotations

import importlib.util
import struct
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ports  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


shot = _load(REPO / "scripts" / "screenshot_mlflow.py", "screenshot_mlflow")


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory, ray_session):
    """Run the demo job in tiny settings on the shared Ray runtime; its MLflow store is what the UI reads."""
    demo = _load(REPO / "jobs" / "demo.py", "deeplense_demo")
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--quick", "--out", str(out)]) == 0
    return {"out": out, "paths": demo.paths(out), "settings": demo.QUICK, "module": demo}


def _start_server(p: dict, log_dir: Path, tries: int = 3):
    """`mlflow server` on a port from _ports.py; started again on a new port, up to ``tries`` times in all,
    if it exits early or its log says the address is in use (another process took the port after it was
    checked free). A server that neither comes up nor fails to bind ends the fixture with its log tail."""
    tails = []
    for attempt in range(1, tries + 1):
        port = _ports.free_port()
        log = log_dir / f"server-{attempt}.log"
        proc = shot.start_mlflow_server(f"sqlite:///{p['db']}", port=port,
                                        artifacts_destination=str(p["artifacts"]), log_path=log)
        base = f"http://127.0.0.1:{port}"
        try:
            shot.wait_healthy(base, proc, timeout=300)
            time.sleep(1)  # /health may have been answered by another process's server on a taken port
            if proc.poll() is None and not _ports.address_in_use(log.read_text(errors="replace")):
                return proc, base
            error = "it exited, or its log says the address is in use, after /health answered"
        except RuntimeError as exc:
            error = str(exc)
        exited = proc.poll() is not None
        shot.stop_server(proc)
        text = log.read_text(errors="replace")
        tails.append(f"try {attempt} on port {port}: {error}\n{text[-3000:]}")
        if not (exited or _ports.address_in_use(text)):
            break  # up and running but never healthy: not a port problem
    raise RuntimeError("mlflow server did not come up:\n" + "\n".join(tails))


@pytest.fixture(scope="module")
def server(demo_store, tmp_path_factory):
    proc, base = _start_server(demo_store["paths"], tmp_path_factory.mktemp("mlflow-server"))
    yield base
    shot.stop_server(proc)
    assert proc.poll() is not None


def _runs(base: str, exp_id: str) -> list[dict]:
    return shot.rest(base, "runs/search", {"experiment_ids": [exp_id], "max_results": 1000}).get("runs", [])


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def test_runs_metrics_and_artifacts_through_rest(demo_store, server):
    s = demo_store["settings"]
    exp_id = shot.experiment_id(server, s.experiment)
    runs = _runs(server, exp_id)
    parents = [r for r in runs if "mlflow.parentRunId" not in _tags(r)]
    children = [r for r in runs if "mlflow.parentRunId" in _tags(r)]
    assert len(parents) == 1, [r["info"]["run_name"] for r in runs]
    parent = parents[0]
    assert parent["info"]["status"] == "FINISHED"
    assert len(children) == s.num_samples
    assert {_tags(c)["mlflow.parentRunId"] for c in children} == {parent["info"]["run_id"]}

    # The search's summary metrics, including the best checkpoint's test-split evaluation.
    pm = _metrics(parent)
    assert 0.0 <= pm["best_val_auc_macro"] <= 1.0
    test_keys = [k for k in pm if k.startswith("test_")]
    assert test_keys and all(0.0 <= pm[k] <= 1.0 for k in test_keys if "acc" in k or "auc" in k), pm

    # Per-epoch history of every trial, identical to what the store itself holds.
    from mlflow.tracking import MlflowClient

    direct = MlflowClient(tracking_uri=f"sqlite:///{demo_store['paths']['db']}")
    for child in children:
        run_id = child["info"]["run_id"]
        hist = shot.rest(server, "metrics/get-history", {"run_id": run_id, "metric_key": "val_auc_macro"},
                         method="GET")["metrics"]
        assert 1 <= len(hist) <= s.max_epochs
        assert sorted(h["step"] for h in hist) == list(range(1, len(hist) + 1))
        want = sorted((m.step, m.value) for m in direct.get_metric_history(run_id, "val_auc_macro"))
        assert sorted((h["step"], h["value"]) for h in hist) == want

    # Artifacts of the search: listed by the server, and their content served back.
    listed = shot.rest(server, "artifacts/list", {"run_id": parent["info"]["run_id"]}, method="GET")
    names = {f["path"] for f in listed.get("files", [])}
    assert "best_config.yaml" in names, names
    assert any(n.endswith(".png") for n in names), names
    import urllib.request

    import yaml

    url = f"{server}/get-artifact?path=best_config.yaml&run_uuid={parent['info']['run_id']}"
    with urllib.request.urlopen(url, timeout=30) as r:
        best = yaml.safe_load(r.read())
    assert best["model"] == s.model
    assert best["trial_id"] == _tags(parent)["tune.best_trial_id"]
    assert abs(best["best_metric"] - pm["best_val_auc_macro"]) < 1e-9


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(shot.chromium_binary() is None, reason="Chromium not installed (Debian: apt-get install "
                    "chromium; .ci/run does)")
def test_headless_chromium_screenshot(demo_store, server, tmp_path):
    exp_id = shot.experiment_id(server, demo_store["settings"].experiment)
    url = shot.experiment_page_url(server, exp_id)
    out = shot.screenshot(url, tmp_path / "ui.png", width=1400, height=900)
    assert _png_size(out) == (1400, 900)
    import matplotlib.image

    img = matplotlib.image.imread(out)[..., :3]
    # Not a blank page: many distinct colours and a good share of non-background pixels (text, table, icons).
    assert img.std() > 0.05
    non_white = (img.min(axis=-1) < 0.85).mean()
    assert 0.02 < non_white < 0.9, non_white


def _visible_text(html: str) -> str:
    import re

    text = re.sub(r"<style[^>]*>.*?</style>", " ", html, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


@pytest.mark.skipif(shot.chromium_binary() is None, reason="Chromium not installed (Debian: apt-get install "
                    "chromium; .ci/run does)")
def test_ui_shows_training_view_datasets_and_logged_model(demo_store, server):
    """As a user reads it: the experiment opens in the model-training view, every run lists its dataset
    (name and manifest digest), and the search run lists the best model under its logged models."""
    import hashlib

    from deeplense_ray.tracking.datasets import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    s = demo_store["settings"]
    exp_id = shot.experiment_id(server, s.experiment)
    exp = shot.rest(server, "experiments/get", {"experiment_id": exp_id}, method="GET")["experiment"]
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

    data = demo_store["paths"]["data"]
    digest = hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()[:16]
    runs = _runs(server, exp_id)
    for run in runs:
        inputs = run.get("inputs", {}).get("dataset_inputs", [])
        assert [(i["dataset"]["name"], i["dataset"]["digest"]) for i in inputs] == [(data.name, digest)], run

    page = _visible_text(shot.rendered_dom(shot.experiment_page_url(server, exp_id)))
    assert "Training runs" in page, page[:2000]
    assert f"{data.name} ({digest})" in page, page[:2000]

    parent = next(r for r in runs if "mlflow.parentRunId" not in _tags(r))
    run_url = f"{server}/#/experiments/{exp_id}/runs/{parent['info']['run_id']}"
    run_page = _visible_text(shot.rendered_dom(run_url))
    assert "Logged models (1)" in run_page, run_page[:2000]


@pytest.fixture(scope="module")
def tiny_search_store(tmp_path_factory):
    """A store as a search leaves it, logged through MLflow's client: a parent run with two child runs
    (metrics per epoch, a param each) and the parent's summary metric."""
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("tiny-search")
    p = {"db": root / "mlflow.db", "artifacts": root / "mlartifacts"}
    client = MlflowClient(tracking_uri=f"sqlite:///{p['db']}")
    exp = client.create_experiment("ui-cdp", artifact_location=p["artifacts"].as_uri())
    parent = client.create_run(exp, run_name="search-parent-run")
    children = []
    for i in range(2):
        child = client.create_run(exp, run_name=f"trial-child-{i}",
                                  tags={"mlflow.parentRunId": parent.info.run_id})
        client.log_param(child.info.run_id, "lr", f"{1e-3 * (i + 1):g}")
        for step in (1, 2, 3):
            client.log_metric(child.info.run_id, "val_auc_macro", 0.55 + 0.1 * step + 0.01 * i, step=step)
        client.set_terminated(child.info.run_id)
        children.append(child.info.run_id)
    client.log_metric(parent.info.run_id, "best_val_auc_macro", 0.86)
    client.set_terminated(parent.info.run_id)
    return {"paths": p, "experiment": "ui-cdp", "parent": parent.info.run_id, "children": children}


@pytest.fixture(scope="module")
def tiny_server(tiny_search_store, tmp_path_factory):
    proc, base = _start_server(tiny_search_store["paths"], tmp_path_factory.mktemp("mlflow-tiny-server"))
    yield base
    shot.stop_server(proc)


@pytest.mark.timeout(600)
@pytest.mark.skipif(shot.chromium_binary() is None, reason="Chromium not installed (Debian: apt-get install "
                    "chromium; .ci/run does)")
def test_cdp_screenshot_closes_assistant_and_expands_child_runs(tiny_search_store, tiny_server, tmp_path):
    """Chromium driven through the DevTools protocol: at capture time the runs table shows the parent's child
    runs and the requested metric column, MLflow's assistant side panel is not in the page, and the PNG has
    the requested size."""
    s = tiny_search_store
    exp_id = shot.experiment_id(tiny_server, s["experiment"])
    with shot.Browser(width=1600, height=900, timeout=60) as browser:
        shown = shot.show_runs_page(browser, tiny_server, exp_id, columns=["metrics.`val_auc_macro`"],
                                    timeout=240)
        assert set(shown["rows"]) == {s["parent"], *s["children"]}, shown
        assert browser.cdp.evaluate(shot.ASSISTANT_PRESENT_JS) is False
        text = browser.cdp.evaluate("document.body.innerText")
        for name in ("search-parent-run", "trial-child-0", "trial-child-1", "val_auc_macro"):
            assert name in text, text[-2000:]
        assert browser.cdp.evaluate("[innerWidth, innerHeight]") == [1600, 900]
        out = browser.capture_png(tmp_path / "runs.png")
    assert _png_size(out) == (1600, 900)
    assert not list(tmp_path.glob(".*tmp*")), "temporary PNG left behind"
    import matplotlib.image

    img = matplotlib.image.imread(out)[..., :3]
    # not blank: text, icons and table lines on the page's background (three rows: a sparse page)
    assert img.std() > 0.02
    assert 0.005 < (img.min(axis=-1) < 0.85).mean() < 0.9


@pytest.mark.timeout(600)
@pytest.mark.skipif(shot.chromium_binary() is None, reason="Chromium not installed (Debian: apt-get install "
                    "chromium; .ci/run does)")
def test_screenshot_script_end_to_end(tiny_search_store, tmp_path):
    """The script as the docs run it: its own server over the store, the PNG at the requested size."""
    p = tiny_search_store["paths"]
    out = tmp_path / "docs" / "ui.png"
    rc = shot.main(["--backend-store-uri", f"sqlite:///{p['db']}", "--artifacts-destination",
                    str(p["artifacts"]), "--experiment", tiny_search_store["experiment"], "--out", str(out),
                    "--width", "1280", "--height", "800", "--timeout", "240"])
    assert rc == 0
    assert _png_size(out) == (1280, 800)
