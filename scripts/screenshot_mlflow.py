#!/usr/bin/env python
"""Screenshot the MLflow UI's experiment page with headless Chromium (Debian package `chromium`).

Starts `mlflow server` on 127.0.0.1 over an existing store (or uses --url of a running one), finds the
experiment by name through the REST API, and saves a PNG of its runs page:

    python scripts/screenshot_mlflow.py --backend-store-uri sqlite:////abs/run/mlflow.db \\
        --artifacts-destination /abs/run/mlartifacts --experiment deeplense-demo --out docs/mlflow_ui.png
    python scripts/screenshot_mlflow.py --url http://127.0.0.1:5000 --experiment deeplense-demo

The helpers (free_port, start_mlflow_server, wait_healthy, rest, chromium_binary, screenshot) are reused by
tests/test_mlflow_ui.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


_handed_ports: set[int] = set()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port that nothing is bound to right now, drawn at random below the kernel's ephemeral range
    (from 20000; ports the kernel never gives to outgoing connections) and never returned twice by this
    process. Another process can still take it before the server binds it: retry with a new one then."""
    eph_lo, eph_hi = _ephemeral_range()
    lo, hi = (20000, eph_lo) if eph_lo - 20000 >= 2000 else (eph_hi + 1, 65536)
    candidates = [p for p in range(lo, hi) if p not in _handed_ports]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_ports.add(port)
        return port
    raise RuntimeError(f"no free port in [{lo}, {hi})")


def start_mlflow_server(
    backend_store_uri: str,
    *,
    port: int,
    artifacts_destination: str | None = None,
    log_path: str | Path | None = None,
    mlflow_bin: str | None = None,
) -> subprocess.Popen:
    """Start `mlflow server --host 127.0.0.1 --port PORT` over ``backend_store_uri`` (absolute sqlite:////...
    or a database URI). The caller stops it (``proc.terminate()``); see :func:`stop_server`."""
    exe = mlflow_bin or str(Path(sys.executable).with_name("mlflow"))
    if not os.path.exists(exe):
        exe = shutil.which("mlflow") or "mlflow"
    cmd = [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_store_uri]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        # own session: stop_server signals the whole group (uvicorn/gunicorn workers included)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_path:
            log.close()


def stop_server(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL if needed."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


def wait_healthy(base_url: str, proc: subprocess.Popen | None = None, timeout: float = 300) -> None:
    """Poll ``base_url/health`` until it answers OK; RuntimeError if the server exits or times out."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with status {proc.returncode} before {base_url} was up")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {base_url} not healthy after {timeout:.0f} s ({last})")


def rest(base_url: str, endpoint: str, payload: dict | None = None, *, method: str | None = None) -> dict:
    """Call ``/api/2.0/mlflow/<endpoint>``: POST JSON if payload, else GET with the payload as query."""
    url = f"{base_url}/api/2.0/mlflow/{endpoint}"
    if payload is not None and (method or "POST") == "POST":
        req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    else:
        if payload:
            url += "?" + urllib.parse.urlencode(payload)
        req = urllib.request.Request(url, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url}: HTTP {exc.code}: {exc.read()[:500]!r}") from None


def experiment_id(base_url: str, name: str) -> str:
    """The id of experiment ``name`` (RuntimeError listing the experiments there if it does not exist)."""
    try:
        return rest(base_url, "experiments/get-by-name", {"experiment_name": name}, method="GET")[
            "experiment"]["experiment_id"]
    except RuntimeError:
        names = [e["name"] for e in rest(base_url, "experiments/search", {"max_results": 100})
                 .get("experiments", [])]
        raise RuntimeError(f"no experiment {name!r} at {base_url}; there are: {names}") from None


def chromium_binary() -> str | None:
    """Path of a Chromium/Chrome executable, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium_cmd(exe: str, profile: str, url: str, width: int, height: int, budget_ms: int,
                  output: list[str]) -> list[str]:
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
            # the virtual-time budget alone never ran out on MLflow 3's UI under load; --timeout
            # (real ms) makes Chromium stop loading and take the picture anyway
            f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}",
            f"--timeout={budget_ms + 75000}", *output, url]


def _run_chromium(url: str, output: list[str], *, width: int, height: int, budget_ms: int,
                  chromium: str | None, timeout: float) -> tuple[int, str, str]:
    """Run headless Chromium on ``url``; (status, stdout, stderr)."""
    exe = chromium or chromium_binary()
    if exe is None:
        raise FileNotFoundError(f"no Chromium found (tried {', '.join(CHROMIUM_NAMES)}; "
                                "Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = _chromium_cmd(exe, profile, url, width, height, budget_ms, output)
        # own session, so a timeout kills Chromium's zygote and renderer processes too
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate()
            raise RuntimeError(f"chromium did not finish within {timeout:.0f} s: {url}") from None
    return proc.returncode, stdout, stderr


def screenshot(url: str, out: str | Path, *, width: int = 1400, height: int = 900,
               budget_ms: int = 15000, chromium: str | None = None, timeout: float = 300) -> Path:
    """Headless Chromium screenshot of ``url`` into ``out`` (PNG), written to a temporary name first."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_png = out.with_name(f".{out.stem}.tmp.png")
    status, _, stderr = _run_chromium(url, [f"--screenshot={tmp_png}"], width=width, height=height,
                                      budget_ms=budget_ms, chromium=chromium, timeout=timeout)
    if status != 0 or not tmp_png.exists() or tmp_png.stat().st_size == 0:
        raise RuntimeError(f"chromium failed (status {status}): {stderr[-2000:]}")
    os.replace(tmp_png, out)
    return out


def rendered_dom(url: str, *, width: int = 1400, height: int = 900, budget_ms: int = 15000,
                 chromium: str | None = None, timeout: float = 300) -> str:
    """The page's DOM after its scripts ran (what the user sees, as HTML), from headless Chromium."""
    status, stdout, stderr = _run_chromium(url, ["--dump-dom"], width=width, height=height,
                                           budget_ms=budget_ms, chromium=chromium, timeout=timeout)
    if status != 0 or not stdout.strip():
        raise RuntimeError(f"chromium --dump-dom failed (status {status}): {stderr[-2000:]}")
    return stdout


def experiment_page_url(base_url: str, exp_id: str, *, charts: bool = False) -> str:
    """The experiment's runs page (table), or with ``charts`` its metric charts view."""
    return f"{base_url}/#/experiments/{exp_id}/runs" + ("?compareRunsMode=CHART" if charts else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--backend-store-uri", help="start a server over this store (sqlite:////abs/mlflow.db)")
    src.add_argument("--url", help="use a running MLflow server, e.g. http://127.0.0.1:5000")
    ap.add_argument("--artifacts-destination", default=None, help="artifact root for the started server")
    ap.add_argument("--experiment", required=True, help="experiment name")
    ap.add_argument("--out", default="docs/mlflow_ui.png", help="PNG to write (default docs/mlflow_ui.png)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--budget-ms", type=int, default=15000, help="Chromium --virtual-time-budget")
    args = ap.parse_args(argv)

    proc = None
    base = args.url.rstrip("/") if args.url else None
    try:
        if base is None:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            proc = start_mlflow_server(args.backend_store_uri, port=port,
                                       artifacts_destination=args.artifacts_destination)
        wait_healthy(base, proc)
        exp = experiment_id(base, args.experiment)
        url = experiment_page_url(base, exp)
        out = screenshot(url, args.out, width=args.width, height=args.height, budget_ms=args.budget_ms)
        print(f"{url} -> {out} ({out.stat().st_size} bytes)")
    except (RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
