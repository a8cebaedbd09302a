#!/usr/bin/env python
"""Screenshot the MLflow UI's experiment page with headless Chromium (Debian package `chromium`).

Starts `mlflow server` on 127.0.0.1 over an existing store (or uses --url of a running one), finds the
experiment by name through the REST API, and saves a PNG of its runs page. Chromium (`--headless=new`) is
driven through the Chrome DevTools Protocol on a free 127.0.0.1 port, over a minimal WebSocket client here
(stdlib sockets, no extra package): the page is opened, MLflow 3's assistant side panel closed, the search's
parent run expanded to show its child runs (one per trial), metric columns added, the navigation sidebar
folded, and the viewport captured with Page.captureScreenshot (written to a temporary name, then renamed):

    python scripts/screenshot_mlflow.py --backend-store-uri sqlite:////abs/run/mlflow.db \\
        --artifacts-destination /abs/run/mlartifacts --experiment deeplense-demo --out docs/mlflow_ui.png
    python scripts/screenshot_mlflow.py --url http://127.0.0.1:5000 --experiment deeplense-demo

The helpers (free_port, start_mlflow_server, wait_healthy, rest, chromium_binary, screenshot, rendered_dom,
Browser, show_runs_page) are reused by tests/test_mlflow_ui.py.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import socket
import struct
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


def rendered_dom(url: str, *, width: int = 1400, height: int = 900, budget_ms: int = 15000,
                 chromium: str | None = None, timeout: float = 300) -> str:
    """The page's DOM after its scripts ran (what the user sees, as HTML), from headless Chromium."""
    status, stdout, stderr = _run_chromium(url, ["--dump-dom"], width=width, height=height,
                                           budget_ms=budget_ms, chromium=chromium, timeout=timeout)
    if status != 0 or not stdout.strip():
        raise RuntimeError(f"chromium --dump-dom failed (status {status}): {stderr[-2000:]}")
    return stdout


# ---------------------------------------------------------------------------------------------------------
# Chrome DevTools Protocol: a minimal WebSocket client (RFC 6455, client side, over stdlib sockets) and the
# browser session the screenshot is taken through.


class WebSocket:
    """Blocking WebSocket client for ``ws://host:port/path`` (text frames; ping, close, fragmentation)."""

    def __init__(self, url: str, timeout: float = 30):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "ws" or not parts.hostname:
            raise ValueError(f"not a ws:// URL: {url}")
        host, port = parts.hostname, parts.port or 80
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"{url}: connection closed during the WebSocket handshake")
            head += chunk
            if len(head) > 65536:
                raise ConnectionError(f"{url}: handshake answer too long")
        head, self._buf = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if len(lines[0].split()) < 2 or lines[0].split()[1] != "101":
            self.sock.close()
            raise ConnectionError(f"{url}: WebSocket handshake refused: {lines[0]!r}")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
                                  .digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            self.sock.close()
            raise ConnectionError(f"{url}: bad Sec-WebSocket-Accept in the handshake answer")

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)  # a client masks every frame
        self.sock.sendall(header + mask + _mask(payload, mask))

    def send(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self._buf)))
            if not chunk:
                raise ConnectionError("WebSocket closed by the browser")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def recv(self, timeout: float) -> str:
        """The next text message; TimeoutError after ``timeout`` s without a complete one."""
        message, deadline = b"", time.monotonic() + timeout
        while True:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            taken = []  # the frame's bytes read so far: put back on a timeout, so the stream stays in step

            def read(n: int, taken=taken) -> bytes:
                taken.append(self._read(n))
                return taken[-1]

            try:
                b0, b1 = read(2)
                n = b1 & 0x7F
                if n == 126:
                    n = struct.unpack("!H", read(2))[0]
                elif n == 127:
                    n = struct.unpack("!Q", read(8))[0]
                mask = read(4) if b1 & 0x80 else None
                payload = read(n)
            except TimeoutError:
                self._buf = b"".join(taken) + self._buf
                raise TimeoutError(f"no WebSocket message within {timeout:.0f} s") from None
            if mask:
                payload = _mask(payload, mask)
            opcode = b0 & 0x0F
            if opcode == 0x9:  # ping
                self._send_frame(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError("WebSocket closed by the browser")
            elif opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        try:
            self._send_frame(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


def _mask(payload: bytes, mask: bytes) -> bytes:
    """``payload`` XOR the 4-byte ``mask`` repeated (RFC 6455 masking; its own inverse)."""
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


class CDPError(RuntimeError):
    """A DevTools command answered with an error, or the page never got where it was asked to."""


class CDP:
    """One DevTools WebSocket (a page target): ``call`` a method and wait for its answer; events are kept."""

    def __init__(self, ws_url: str, timeout: float = 60):
        self.ws = WebSocket(ws_url, timeout=timeout)
        self.timeout = timeout
        self._next_id = 0
        self.events: list[dict] = []
        #: requests in flight (with Network.enable): request id -> monotonic time it was sent
        self.inflight: dict[str, float] = {}

    def call(self, method: str, params: dict | None = None, *, timeout: float | None = None) -> dict:
        self._next_id += 1
        msg_id = self._next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CDPError(f"{method}: no answer within {timeout or self.timeout:.0f} s")
            try:
                msg = json.loads(self.ws.recv(left))
            except TimeoutError:
                raise CDPError(f"{method}: no answer within {timeout or self.timeout:.0f} s") from None
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise CDPError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self._track(msg)
                self.events.append(msg)
                del self.events[:-1000]

    def _track(self, event: dict) -> None:
        method, params = event["method"], event.get("params", {})
        if method == "Network.requestWillBeSent":
            if not params.get("request", {}).get("url", "").startswith(("data:", "blob:")):
                self.inflight[params["requestId"]] = time.monotonic()
        elif method in ("Network.loadingFinished", "Network.loadingFailed"):
            self.inflight.pop(params.get("requestId"), None)

    def pending_requests(self, *, older_than_ignored: float = 15) -> int:
        """Requests sent and not finished (those in flight for ``older_than_ignored`` s or more, such as a
        long poll, not counted)."""
        now = time.monotonic()
        return sum(1 for t in self.inflight.values() if now - t < older_than_ignored)

    def evaluate(self, expression: str, *, timeout: float | None = None):
        """The value of a JavaScript expression in the page (promises awaited, JSON-able values)."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, timeout=timeout)
        if "exceptionDetails" in res:
            details = res["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"JavaScript error: {text}")
        return res.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float, interval: float = 0.25, what: str = ""):
        """Poll a JavaScript expression until it is truthy; its value, or CDPError after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression, timeout=max(5.0, deadline - time.monotonic()))
            if value:
                return value
            if time.monotonic() >= deadline:
                raise CDPError(f"timed out after {timeout:.0f} s waiting for {what or expression}")
            time.sleep(interval)

    def close(self) -> None:
        self.ws.close()


class Browser:
    """Headless Chromium (``--headless=new``) with its DevTools endpoint on a free 127.0.0.1 port, and a CDP
    session on its page. A context manager: leaving it kills Chromium's whole process group and removes its
    temporary profile.

        with Browser(width=1600, height=900) as b:
            b.cdp.call("Page.navigate", {"url": url})
    """

    def __init__(self, *, width: int = 1600, height: int = 900, chromium: str | None = None,
                 timeout: float = 60, tries: int = 3):
        self.exe = chromium or chromium_binary()
        if self.exe is None:
            raise FileNotFoundError(f"no Chromium found (tried {', '.join(CHROMIUM_NAMES)}; "
                                    "Debian: apt-get install chromium)")
        self.width, self.height, self.timeout, self.tries = width, height, timeout, tries
        self.proc: subprocess.Popen | None = None
        self.cdp: CDP | None = None
        self._profile: tempfile.TemporaryDirectory | None = None
        self._log = None

    def __enter__(self) -> Browser:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _launch(self, port: int) -> str | None:
        """Start Chromium with DevTools on ``port`` of 127.0.0.1; the page target's WebSocket URL, or None if
        it is not listening there (the port taken by another process meanwhile: Chromium then says so, or
        falls back to [::1], which is not used)."""
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-cdp-")
        profile = Path(self._profile.name)
        self._log = open(profile.parent / f"{profile.name}.log", "w+b")  # noqa: SIM115
        cmd = [self.exe, "--headless=new", f"--remote-debugging-port={port}",
               "--remote-debugging-address=127.0.0.1", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--disable-extensions",
               "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile}",
               f"--window-size={self.width},{self.height}", "about:blank"]
        # own session: close() kills the zygote, GPU and renderer processes with it
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        listening = None
        while time.monotonic() < deadline:
            log = Path(self._log.name).read_bytes()
            if self.proc.poll() is not None or b"Cannot start http server" in log:
                return None
            found = re.search(rb"DevTools listening on ws://([^/\s]+)/", log)
            if found:
                listening = found.group(1).decode()
                if listening != f"127.0.0.1:{port}":
                    return None
                try:
                    with urllib.request.urlopen(f"http://{listening}/json/list", timeout=5) as r:
                        targets = json.loads(r.read())
                    pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
                    if pages and pages[0]["webSocketDebuggerUrl"].startswith(f"ws://{listening}/"):
                        return pages[0]["webSocketDebuggerUrl"]
                except (urllib.error.URLError, OSError, ValueError):
                    pass
            time.sleep(0.2)
        return None

    def _log_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def _start(self) -> None:
        tails = []
        for attempt in range(1, self.tries + 1):
            port = free_port()
            ws_url = self._launch(port)
            if ws_url is not None:
                break
            tails.append(f"try {attempt} (port {port}): {self._log_tail()}")
            self._stop_process()
        else:
            raise RuntimeError("chromium's DevTools endpoint never came up:\n" + "\n".join(tails))
        self.cdp = CDP(ws_url, timeout=self.timeout)
        self.cdp.call("Page.enable")
        self.cdp.call("Network.enable")  # requests in flight: CDP.pending_requests
        self.cdp.call("Emulation.setDeviceMetricsOverride",
                      {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    def _stop_process(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, 9)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def close(self) -> None:
        if self.cdp is not None:
            try:
                self.cdp.close()
            except OSError:
                pass
            self.cdp = None
        self._stop_process()

    def goto(self, url: str, *, timeout: float = 120) -> None:
        """Navigate and wait until the document has loaded (the app's own requests may still run)."""
        res = self.cdp.call("Page.navigate", {"url": url}, timeout=timeout)
        if res.get("errorText"):
            raise CDPError(f"navigation to {url} failed: {res['errorText']}")
        self.cdp.wait_for("document.readyState === 'complete'", timeout=timeout, what=f"{url} to load")

    def capture_png(self, out: str | Path) -> Path:
        """Page.captureScreenshot of the viewport into ``out``, written to a temporary name and renamed."""
        res = self.cdp.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False,
                                                       "fromSurface": True}, timeout=self.timeout)
        data = base64.b64decode(res["data"])
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            raise CDPError("Page.captureScreenshot returned no PNG")
        out = Path(out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".tmp.png", dir=out.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600): a normal file's mode instead
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return out


def experiment_page_url(base_url: str, exp_id: str, *, charts: bool = False) -> str:
    """The experiment's runs page (table), or with ``charts`` its metric charts view."""
    return f"{base_url}/#/experiments/{exp_id}/runs" + ("?compareRunsMode=CHART" if charts else "")


# MLflow 3's UI, as seen in its DOM and localStorage (3.17): the assistant side panel's elements carry
# data-component-id "mlflow.assistant.chat_panel.*" (its close button: ".close"), and whether it is open
# is remembered under ASSISTANT_OPEN_KEY; it opens by itself on a first visit unless ASSISTANT_AUTO_KEY says
# it already did. Runs table rows are ag-grid rows whose row-id is the run's id; a parent's expand button is
# in its run-name cell. The page's table settings (columns, expanded parents) live in localStorage under a
# key with "ExperimentPage" and "ReactComponentState" in its name.
ASSISTANT_SELECTOR = '[data-component-id^="mlflow.assistant.chat_panel"]'
ASSISTANT_CLOSE_SELECTOR = '[data-component-id="mlflow.assistant.chat_panel.close"]'
ASSISTANT_OPEN_KEY = "mlflow.assistant.panelOpen_v1"
ASSISTANT_AUTO_KEY = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"
EXPAND_BUTTON_SELECTOR = 'button[data-component-id*="runnamecellrenderer"]'
SIDEBAR_TOGGLE_SELECTOR = '[data-component-id="mlflow_header.toggle_sidebar_button"]'
#: Metric columns shown by default: best and last validation AUC of each trial (and of the search), its last
#: validation accuracy, the search's test AUC of the best checkpoint.
DEFAULT_METRICS = ("best_val_auc_macro", "val_auc_macro", "val_acc", "test_auc_macro")

_HIDE_ASSISTANT_JS = f"""try {{
  localStorage.setItem({json.dumps(ASSISTANT_OPEN_KEY)}, "false");
  localStorage.setItem({json.dumps(ASSISTANT_AUTO_KEY)}, "true");
}} catch (e) {{}}"""

#: JavaScript: is the assistant panel (any of its elements) in the page?
ASSISTANT_PRESENT_JS = f"document.querySelector({json.dumps(ASSISTANT_SELECTOR)}) !== null"


#: JavaScript: the run ids of the table rows in the DOM (ag-grid renders each row in several column blocks).
ROW_IDS_JS = ("[...new Set([...document.querySelectorAll('[role=row][row-id]')]"
              ".map(r => r.getAttribute('row-id')))]")


def wait_settled(cdp: CDP, *, quiet: float = 1.0, timeout: float = 30) -> bool:
    """Wait until the page's DOM (element count and text length) has not changed, and no request of the page
    was in flight (Network.enable: see :class:`Browser`), for ``quiet`` s; False if that did not happen within
    ``timeout`` s (an auto-refreshing page may never be still: take it as it is then)."""
    probe = "[document.getElementsByTagName('*').length, document.body ? document.body.innerText.length : 0]"
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = [*cdp.evaluate(probe), cdp.pending_requests() > 0]
        if now != last or now[-1]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
        time.sleep(0.2)
    return False


def screenshot(url: str, out: str | Path, *, width: int = 1400, height: int = 900,
               budget_ms: int = 15000, chromium: str | None = None, timeout: float = 300) -> Path:
    """Screenshot of any page: headless Chromium through the DevTools protocol, after the page loaded and
    its DOM and network were quiet for 1.5 s (waiting at most ``budget_ms`` for that), into ``out`` (PNG,
    written to a temporary name first). For an experiment's runs page see :func:`runs_page_screenshot`."""
    with Browser(width=width, height=height, chromium=chromium, timeout=min(timeout, 120)) as b:
        b.goto(url, timeout=timeout)
        wait_settled(b.cdp, quiet=1.5, timeout=budget_ms / 1000)
        return b.capture_png(out)


def _runs_tree(base_url: str, exp_id: str) -> dict[str, dict]:
    """run id -> {"name", "parent"} of the experiment's active runs (through the REST API)."""
    runs, token = {}, None
    while True:
        payload = {"experiment_ids": [exp_id], "max_results": 1000}
        if token:
            payload["page_token"] = token
        page = rest(base_url, "runs/search", payload)
        for r in page.get("runs", []):
            tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
            runs[r["info"]["run_id"]] = {"name": r["info"].get("run_name", ""),
                                         "parent": tags.get("mlflow.parentRunId")}
        token = page.get("next_page_token")
        if not token:
            return runs


def _set_table_state(cdp: CDP, exp_id: str, columns: list[str], expanded: list[str], *,
                     hide: list[str] = ()) -> bool:
    """Add ``columns`` (e.g. "metrics.`val_auc_macro`"), remove ``hide`` and expand the ``expanded`` parent
    runs in the runs table's saved settings; False when no such settings are in localStorage (another MLflow
    version: nothing changed)."""
    js = f"""(() => {{
      const keys = Object.keys(localStorage).filter(k => k.includes('ExperimentPage') &&
          k.includes('ReactComponentState') && k.includes({json.dumps(json.dumps(exp_id))}));
      const hide = {json.dumps(list(hide))};
      let changed = false;
      for (const k of keys) {{
        let s; try {{ s = JSON.parse(localStorage.getItem(k)); }} catch (e) {{ continue; }}
        if (!s || !Array.isArray(s.selectedColumns)) continue;
        s.selectedColumns = s.selectedColumns.filter(c => !hide.includes(c));
        for (const c of {json.dumps(list(columns))})
          if (!s.selectedColumns.includes(c)) s.selectedColumns.push(c);
        s.runsExpanded = Object.assign({{}}, s.runsExpanded || {{}});
        for (const r of {json.dumps(list(expanded))}) s.runsExpanded[r] = true;
        localStorage.setItem(k, JSON.stringify(s));
        changed = true;
      }}
      return changed;
    }})()"""
    return bool(cdp.evaluate(js))


def show_runs_page(browser: Browser, base_url: str, exp_id: str, *, columns: list[str] = (),
                   hide: list[str] = (), collapse_sidebar: bool = False,
                   timeout: float = 180) -> dict:
    """Open the experiment's runs table in ``browser`` as a reader wants it: the assistant side panel closed,
    every parent run expanded so its child runs show, ``columns`` added (MLflow column ids such as
    "metrics.`val_auc_macro`" or "params.`lr`"), ``hide`` columns removed (such as "attributes.`Source`"),
    with ``collapse_sidebar`` the navigation sidebar folded to its icons (more room for the table; skipped if
    its toggle is not found). Returns {"runs": run id -> {name, parent}, "rows": run ids of the rows in the
    DOM}. CDPError when the page does not get there within ``timeout`` s."""
    cdp = browser.cdp
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(5.0, deadline - time.monotonic())

    runs = _runs_tree(base_url, exp_id)
    parents = sorted({r["parent"] for r in runs.values() if r["parent"] in runs})
    # before any of the app's scripts: the assistant panel starts closed and does not open on its own
    cdp.call("Page.addScriptToEvaluateOnNewDocument", {"source": _HIDE_ASSISTANT_JS})
    url = experiment_page_url(base_url, exp_id)
    any_row = "document.querySelectorAll('[role=row][row-id]').length > 0" if runs else "true"
    browser.goto(url, timeout=left())
    cdp.wait_for(any_row, timeout=left(), what="the runs table")
    if (columns or hide or parents) and _set_table_state(cdp, exp_id, list(columns), parents,
                                                         hide=list(hide)):
        cdp.call("Page.reload", {"ignoreCache": False}, timeout=left())
        time.sleep(0.5)
        cdp.wait_for("document.readyState === 'complete'", timeout=left(), what="the reload")
        cdp.wait_for(any_row, timeout=left(), what="the runs table after the reload")

    # the assistant panel, if it opened anyway: its close button
    if cdp.evaluate(ASSISTANT_PRESENT_JS):
        cdp.evaluate(f"(() => {{ const b = document.querySelector({json.dumps(ASSISTANT_CLOSE_SELECTOR)});"
                     " if (b) b.click(); return !!b; })()")
        cdp.wait_for(f"!({ASSISTANT_PRESENT_JS})", timeout=min(left(), 30),
                     what="the assistant panel to close")

    # parents whose children are not in the table yet: click their expand button
    for parent in parents:
        kids = [rid for rid, r in runs.items() if r["parent"] == parent][:50]
        any_kid = " || ".join(f"!!document.querySelector('[role=row][row-id=\"{k}\"]')" for k in kids)
        if cdp.evaluate(any_kid):
            continue
        clicked = cdp.evaluate(f"""(() => {{
          for (const row of document.querySelectorAll('[role=row][row-id="{parent}"]')) {{
            const b = row.querySelector({json.dumps(EXPAND_BUTTON_SELECTOR)});
            if (b) {{ b.click(); return true; }}
          }}
          return false; }})()""")
        if clicked:
            cdp.wait_for(any_kid, timeout=min(left(), 30), what=f"the child runs of {runs[parent]['name']}")
    if collapse_sidebar:
        cdp.evaluate(f"document.querySelector({json.dumps(SIDEBAR_TOGGLE_SELECTOR)})?.click()")
    wait_settled(cdp, timeout=min(left(), 15))
    if cdp.evaluate(ASSISTANT_PRESENT_JS):  # reopened by something late: close it again
        cdp.evaluate(f"document.querySelector({json.dumps(ASSISTANT_CLOSE_SELECTOR)})?.click()")
        cdp.wait_for(f"!({ASSISTANT_PRESENT_JS})", timeout=min(left(), 30),
                     what="the assistant panel to close")
        wait_settled(cdp, timeout=min(left(), 10))
    return {"runs": runs, "rows": cdp.evaluate(ROW_IDS_JS)}


def runs_page_screenshot(base_url: str, exp_id: str, out: str | Path, *, width: int = 1600,
                         height: int = 900, columns: list[str] = (), hide: list[str] = (),
                         collapse_sidebar: bool = True, chromium: str | None = None,
                         timeout: float = 300) -> Path:
    """PNG of the experiment's runs table (see :func:`show_runs_page`) at ``width`` x ``height``."""
    with Browser(width=width, height=height, chromium=chromium, timeout=min(timeout, 120)) as b:
        show_runs_page(b, base_url, exp_id, columns=columns, hide=hide, collapse_sidebar=collapse_sidebar,
                       timeout=timeout)
        return b.capture_png(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--backend-store-uri", help="start a server over this store (sqlite:////abs/mlflow.db)")
    src.add_argument("--url", help="use a running MLflow server, e.g. http://127.0.0.1:5000")
    ap.add_argument("--artifacts-destination", default=None, help="artifact root for the started server")
    ap.add_argument("--experiment", required=True, help="experiment name")
    ap.add_argument("--out", default="docs/mlflow_ui.png", help="PNG to write (default docs/mlflow_ui.png)")
    ap.add_argument("--width", type=int, default=1600)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--metric", action="append", default=None, metavar="KEY",
                    help="metric column to show (repeatable; default: " + ", ".join(DEFAULT_METRICS) + ")")
    ap.add_argument("--param", action="append", default=[], metavar="KEY", help="param column (repeatable)")
    ap.add_argument("--hide", action="append", default=None, metavar="COLUMN",
                    help="attribute column to hide (repeatable; default: Source, empty for runs of jobs)")
    ap.add_argument("--keep-sidebar", action="store_true", help="leave MLflow's navigation sidebar unfolded")
    ap.add_argument("--timeout", type=float, default=300, help="seconds for the page to get ready")
    args = ap.parse_args(argv)
    columns = [f"metrics.`{k}`" for k in (DEFAULT_METRICS if args.metric is None else args.metric)]
    columns += [f"params.`{k}`" for k in args.param]
    args.hide = ["Source"] if args.hide is None else args.hide

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
        out = runs_page_screenshot(base, exp, args.out, width=args.width, height=args.height,
                                   columns=columns, hide=[f"attributes.`{c}`" for c in args.hide],
                                   collapse_sidebar=not args.keep_sidebar, timeout=args.timeout)
        print(f"{url} -> {out} ({out.stat().st_size} bytes)")
    except (RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if proc is not None:
            stop_server(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
