"""What a researcher reads on the terminal: one line per epoch, trial start/end lines, end-of-job summaries.

Ray's own output (Tune's per-trial config boxes and status tables, the workers' Ray Data progress bars) is
off unless a job runs with ``--verbose`` (:func:`quiet_ray`); these lines replace it. Everything here is
printed by the driver, as plain text (no escape codes), so a log of a long search stays readable.

- :func:`epoch_line`: ``epoch 3/10  loss 0.9812  val_loss 1.0021  val_acc 0.512  val_auc_macro 0.6530
  412 img/s  elapsed 0:01:12  eta 0:02:48``;
- ``deeplense_ray.tune.console.SearchConsole`` prints the same lines for the trials of a search;
- :class:`RunWatcher`: the same epoch lines for one training run (``jobs/train.py``), read from its MLflow
  run by a driver thread while ``trainer.fit()`` blocks;
- :func:`mlflow_ui_command`, :func:`where_lines`: where a job's results are, and how to open them;
- :func:`chance_warning`: the message for a test AUC whose confidence interval includes 0.5.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

#: Validation metrics shown on an epoch line, in order (when reported).
EPOCH_KEYS: tuple[str, ...] = ("val_loss", "val_acc", "val_auc_macro")
#: Seconds without a printed line after which a heartbeat line says what is still running.
HEARTBEAT_S = 60.0


def hms(seconds: float) -> str:
    """``H:MM:SS`` of a duration (``?`` when unknown)."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def fmt_num(v: Any, digits: int = 4) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "nan" if math.isnan(f) else f"{f:.{digits}f}"


def eta_seconds(elapsed: float, epochs_done: int, max_epochs: int) -> float:
    """Remaining seconds at the mean pace of the epochs so far (start-up included: an upper bound)."""
    if epochs_done <= 0:
        return math.nan
    return elapsed / epochs_done * max(0, max_epochs - epochs_done)


def epoch_line(
    metrics: Mapping[str, Any],
    *,
    max_epochs: int,
    elapsed: float,
    prefix: str = "",
    keys: Sequence[str] = EPOCH_KEYS,
) -> str:
    """One epoch as one line: epoch k/n, train loss, validation metrics, images/s, elapsed and ETA."""
    epoch = int(metrics.get("epoch", 0))
    parts = [f"epoch {epoch}/{max_epochs}", f"loss {fmt_num(metrics.get('train_loss'))}"]
    parts += [f"{k} {fmt_num(metrics[k])}" for k in keys if k in metrics]
    if metrics.get("images_per_s") is not None:
        parts.append(f"{float(metrics['images_per_s']):.0f} img/s")
    parts.append(f"elapsed {hms(elapsed)}")
    if epoch < max_epochs:
        parts.append(f"eta {hms(eta_seconds(elapsed, epoch, max_epochs))}")
    if metrics.get("diverged") == 1:
        parts.append("DIVERGED")
    return f"{prefix}{'  '.join(parts)}"


def quiet_ray(verbose: bool) -> dict[str, Any]:
    """Environment and ``ray.init`` keywords for a job's Ray output; call before Ray starts.

    Not verbose (the default): Ray Data progress bars off in every process started from here
    (``RAY_DATA_DISABLE_PROGRESS_BARS``, inherited by a local runtime's workers and sent to the cluster's
    workers through the job's runtime environment) and the workers' stdout/stderr not forwarded to the driver
    (``log_to_driver=False``; a failed trial's error still reaches the driver, with its log file); the
    INFO logs of Ray Data, Tune, Train, MLflow and Optuna in the driver are raised to WARNING.
    Returns the ``ray.init`` keywords to use (``{}`` when verbose).
    """
    if verbose:
        return {}
    import logging

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's legacy reporter: silent at verbose=0 (no header box)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    import mlflow  # noqa: F401  (it sets its loggers' level when imported: import first, then lower them)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    for name in ("ray.tune", "ray.train", "mlflow", "optuna", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # "progress bars disabled", execution plans
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format notice on every model
    # Tune's "the `...` operation took 0.95 s, which may be a performance bottleneck" on a loaded machine
    logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass
    return {"log_to_driver": False}


def tune_verbosity(verbose: bool) -> int:
    """``tune.RunConfig(verbose=...)``: Tune's status tables and config boxes only with ``--verbose``."""
    return 1 if verbose else 0


# ----------------------------------------------------------------------------------------------- one run
class RunWatcher:
    """Prints one line per epoch of one MLflow run while it trains (a daemon thread polling the run).

    Rank 0 of the training loop logs every epoch to the run once its checkpoint is persisted; the watcher
    reads the new steps every ``poll_s`` seconds. Use as a context manager around ``trainer.fit()``.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        *,
        max_epochs: int,
        poll_s: float = 2.0,
        stream: TextIO | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.max_epochs = int(max_epochs)
        self.poll_s = float(poll_s)
        self.stream = stream
        self.heartbeat_s = float(heartbeat_s)
        self.printed: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.t0 = time.time()
        self.last_print = self.t0

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)
        self.last_print = time.time()

    def poll(self) -> list[str]:
        """Print (and return) the lines of the epochs logged since the last poll."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.tracking_uri)
        steps = {m.step for m in client.get_metric_history(self.run_id, "train_loss")} - self.printed
        if not steps:
            return []
        by_step: dict[int, dict[str, float]] = {s: {"epoch": s} for s in steps}
        for key in ("train_loss", "images_per_s", "diverged", *EPOCH_KEYS):
            for m in client.get_metric_history(self.run_id, key):
                if m.step in by_step:
                    by_step[m.step][key] = m.value
        lines = []
        for s in sorted(by_step):
            lines.append(epoch_line(by_step[s], max_epochs=self.max_epochs, elapsed=time.time() - self.t0))
            self._print(lines[-1])
            self.printed.add(s)
        return lines

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a busy SQLite store is retried at the next poll
                continue
            if time.time() - self.last_print >= self.heartbeat_s:
                what = "start-up and the first epoch" if not self.printed else "the next epoch"
                self._print(f"[train] {hms(time.time() - self.t0)} elapsed: waiting for {what}")

    def __enter__(self) -> RunWatcher:
        self.t0 = self.last_print = time.time()
        self._thread = threading.Thread(target=self._run, name="deeplense-run-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.poll()
        except Exception:  # noqa: BLE001
            pass


# ----------------------------------------------------------------------------------------------- the end
def mlflow_ui_command(
    tracking_uri: str, *, port: int = 5000, artifacts: str | os.PathLike[str] | None = None
) -> str:
    """The exact command that opens the MLflow UI over ``tracking_uri`` (a local SQLite store also gets its
    ``--artifacts-destination``, the ``mlartifacts/`` beside the database), each word shell-quoted."""
    from shlex import quote

    exe = Path(sys.executable).with_name("mlflow")
    cmd = f"{quote(str(exe)) if exe.exists() else 'mlflow'} ui --backend-store-uri {quote(tracking_uri)}"
    if artifacts is None:
        from deeplense_ray.tracking.mlflow_utils import default_artifact_location

        artifacts = default_artifact_location(tracking_uri)
    if artifacts and str(artifacts).startswith("file://"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        artifacts = url2pathname(urlparse(str(artifacts)).path)
    if artifacts:
        cmd += f" --artifacts-destination {quote(str(artifacts))}"
    return f"{cmd} --host 127.0.0.1 --port {port}"


def mlflow_run_url(experiment_id: str, run_id: str, port: int = 5000) -> str:
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}"


def where_lines(
    title: str, items: Iterable[tuple[str, Any]], *, tracking_uri: str | None = None
) -> list[str]:
    """The block a job prints last: ``title``, aligned ``label  value`` rows (None values left out) and,
    with a tracking URI, the command that opens the MLflow UI."""
    rows = [(str(k), str(v)) for k, v in items if v is not None and v != ""]
    width = max((len(k) for k, _ in rows), default=0)
    lines = [title, *(f"  {k:<{width}}  {v}" for k, v in rows)]
    if tracking_uri:
        lines += ["Open the MLflow UI, then http://127.0.0.1:5000 :", f"  {mlflow_ui_command(tracking_uri)}"]
    return lines


def chance_warning(metric: str, value: float, ci: Sequence[float] | None) -> str | None:
    """A warning when ``ci`` (low, high) of an AUC includes 0.5 (the model is not distinguishable from
    chance), else None."""
    if ci is None or len(ci) != 2 or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in ci):
        return None
    lo, hi = float(ci[0]), float(ci[1])
    if not lo <= 0.5 <= hi:
        return None
    return (
        f"WARNING: {metric} = {fmt_num(value)} is consistent with chance: its 95% bootstrap interval "
        f"[{lo:.4f}, {hi:.4f}] includes 0.5 (more data, epochs or a larger model are needed)"
    )


def dir_size(path: str | os.PathLike[str]) -> int:
    """Bytes of the regular files under ``path`` (0 if it does not exist; links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            if not os.path.islink(p):
                try:
                    total += os.path.getsize(p)
                except OSError:
                    continue
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
