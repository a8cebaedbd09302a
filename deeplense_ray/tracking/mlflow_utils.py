"""MLflow plumbing: absolute tracking URIs, a reachability check, one experiment created once by the driver,
run parameters.

Nothing here touches MLflow's process-global state (``mlflow.set_tracking_uri``): every call goes through an
``MlflowClient`` bound to an explicit, absolute URI, so that Ray workers and Tune trials (which change their
working directory) write to the same store.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

from deeplense_ray.tracking.datasets import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, set_experiment_kind

#: Tracking-store schemes that name a server or a remote database: passed through unchanged.
REMOTE_SCHEMES: tuple[str, ...] = (
    "http",
    "https",
    "databricks",
    "databricks-uc",
    "postgresql",
    "mysql",
    "mssql",
)
DEFAULT_DB_NAME = "mlflow.db"
DEFAULT_ARTIFACT_DIR = "mlartifacts"
#: Seconds a tracking server (or database host) may take to answer the check before a job starts.
REACHABLE_TIMEOUT_S = 5.0
#: Default ports of the database schemes, for the TCP check of a remote database store.
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
#: Characters SQLAlchemy reads specially in a ``sqlite:///`` URI's path (percent-decoding, query, fragment).
_SQLITE_PATH_SAFE = "/ !$&'()*+,;=:@[]~"


class TrackingServerError(ValueError):
    """The tracking store does not answer, or refuses the credentials (the message names the URI)."""


def sqlite_uri(db: str | os.PathLike[str]) -> str:
    """The ``sqlite:///`` URI of the database file ``db`` (absolute): ``%``, ``?`` and ``#`` in the path are
    percent-encoded, as SQLAlchemy decodes the path and would otherwise cut it at ``?``."""
    return "sqlite:///" + quote(str(db), safe=_SQLITE_PATH_SAFE)


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (percent-decoded as SQLAlchemy reads it); None for another
    scheme or an in-memory database."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri == "sqlite:///:memory:":
        return None
    return Path(unquote(tracking_uri[len("sqlite:///") :]))


def _abs(path: str | os.PathLike[str], base_dir: str | os.PathLike[str] | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base_dir if base_dir is not None else os.getcwd()).expanduser().resolve() / p
    return p.resolve()


def resolve_tracking_uri(uri: str | None = None, base_dir: str | os.PathLike[str] | None = None) -> str:
    """An absolute MLflow tracking URI.

    Order: ``uri`` if given, else the ``MLFLOW_TRACKING_URI`` environment variable, else
    ``sqlite:///<abs base_dir or cwd>/mlflow.db``. Relative SQLite paths (``sqlite:///runs/mlflow.db``), bare
    paths (``runs/mlflow.db`` -> SQLite; a directory ``runs`` -> ``runs/mlflow.db``) and relative ``file:``
    stores are made absolute against ``base_dir`` (default: the current directory); server and database URIs
    (http, https, postgresql, ...) are returned unchanged. The SQLite file's directory is created. The path
    of a ``sqlite:///`` URI is percent-decoded (as SQLAlchemy reads it); the URI returned encodes ``%``,
    ``?`` and ``#`` (:func:`sqlite_uri`), so any directory name works.
    """
    if uri is None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None:
        uri = str(_abs(DEFAULT_DB_NAME, base_dir))
    uri = str(uri).strip()
    if not uri:
        raise ValueError("tracking URI is empty")
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///"):
            raise ValueError(f"SQLite tracking URI must look like sqlite:///path/mlflow.db, got {uri!r}")
        rest = unquote(uri[len("sqlite:///") :])
        if rest == ":memory:":
            return uri
        db = _abs(rest, base_dir) if not rest.startswith("/") else Path(rest).resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        return sqlite_uri(db)
    scheme = urlparse(uri).scheme.lower()
    if scheme in REMOTE_SCHEMES:
        return uri
    if scheme == "file":
        parsed = urlparse(uri)
        path = parsed.path if parsed.netloc in ("", "localhost") else parsed.netloc + parsed.path
        return _abs(path, base_dir).as_uri()
    if scheme and len(scheme) > 1:
        raise ValueError(
            f"unsupported tracking URI scheme {scheme!r} in {uri!r}; use sqlite:///<path>, file:///<dir>, "
            f"one of {list(REMOTE_SCHEMES)}, or a plain path"
        )
    path = _abs(uri, base_dir)
    db = path if path.suffix == ".db" else path / DEFAULT_DB_NAME
    db.parent.mkdir(parents=True, exist_ok=True)
    return sqlite_uri(db)


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifact root for a new experiment: ``<dir of the SQLite file>/mlartifacts`` as a ``file://`` URI for a
    local SQLite store ("artifacts beside it"); None (the store's own default) otherwise."""
    db = sqlite_path(tracking_uri)
    return (db.parent / DEFAULT_ARTIFACT_DIR).as_uri() if db is not None else None


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client sends: ``MLFLOW_TRACKING_TOKEN`` (bearer), else
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (basic)."""
    import base64

    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        pair = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}
    return {}


def _ssl_context(url: str):
    """TLS as MLflow's client sets it up (``MLFLOW_TRACKING_INSECURE_TLS``,
    ``MLFLOW_TRACKING_SERVER_CERT_PATH``)."""
    import ssl

    if not url.startswith("https:"):
        return None
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true"):
        return ssl._create_unverified_context()  # noqa: S323 - the user asked for it (MLflow's own variable)
    return ssl.create_default_context(cafile=os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None)


def _http_problem(uri: str, timeout_s: float) -> str | None:
    """None if the server at ``uri`` answers an authenticated API call, else why not."""
    import urllib.error
    import urllib.request

    url = uri.rstrip("/") + "/api/2.0/mlflow/experiments/search?max_results=1"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=_ssl_context(url)) as response:
            response.read(1)
        return None
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            how = "MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"
            given = "the credentials given" if _auth_headers() else "no credentials"
            return f"not authorised (HTTP {exc.code} with {given}; set {how})"
        return f"HTTP {exc.code} {exc.reason} from {url}"
    except urllib.error.URLError as exc:
        return f"does not answer ({exc.reason})"
    except OSError as exc:  # timeouts, resets
        return f"does not answer ({type(exc).__name__}: {exc})"


def _tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    import socket

    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"does not answer at {host}:{port} ({exc.strerror or exc})"


def check_tracking_reachable(uri: str | None = None, timeout_s: float = REACHABLE_TIMEOUT_S) -> str:
    """The resolved tracking URI (:func:`resolve_tracking_uri`) once its store answers; TrackingServerError
    naming the URI otherwise, within about ``timeout_s`` seconds (host-name lookup included).

    An http(s) server must answer an authenticated API call with the credentials MLflow's client would send
    (a 401/403 is "not authorised"); a postgresql/mysql/mssql host must accept a TCP connection; local
    SQLite and file stores need no check. Jobs call this before Ray starts and before writing anything.
    """
    import threading

    resolved = resolve_tracking_uri(uri)
    parsed = urlparse(resolved)
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        probe = lambda: _http_problem(resolved, timeout_s)  # noqa: E731
    elif scheme.split("+")[0] in DB_PORTS and parsed.hostname:
        port = parsed.port or DB_PORTS[scheme.split("+")[0]]
        probe = lambda: _tcp_problem(parsed.hostname, port, timeout_s)  # noqa: E731
    else:
        return resolved
    answer: list[str | None] = []
    thread = threading.Thread(target=lambda: answer.append(probe()), daemon=True)  # a slow DNS lookup too
    thread.start()
    thread.join(timeout_s + 0.5)
    why = answer[0] if answer else f"does not answer within {timeout_s:g} s"
    if why is not None:
        shown = resolved if parsed.password is None else resolved.replace(parsed.password, "***")
        raise TrackingServerError(f"MLflow tracking server {shown} {why}")
    return resolved


def reset_auth_admin_password(password: str, *, username: str | None = None, database_uri: str | None = None
                              ) -> bool:
    """Make ``password`` the password of the MLflow basic-auth admin user, if that user exists.

    MLflow's auth app creates the admin with ``MLFLOW_AUTH_ADMIN_PASSWORD`` on first start only; after a
    rotated secret every client would get 401. Run before ``mlflow server --app-name basic-auth`` (in the
    server's working directory: the user store defaults to ``sqlite:///basic_auth.db`` there). ``username``
    and ``database_uri`` default to the auth app's configuration (``MLFLOW_AUTH_CONFIG_PATH``). Returns
    whether the stored password changed (False on first start: the server creates the user itself).
    """
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    if not password:
        raise ValueError("the MLflow admin password is empty")
    config = read_auth_config()
    username = username or config.admin_username
    store = SqlAlchemyStore()
    store.init_db(database_uri or config.database_uri)
    if not store.has_user(username) or store.authenticate_user(username, password):
        return False
    store.update_user(username, password=password)
    return True


def get_or_create_experiment(name: str, tracking_uri: str, *, artifact_location: str | None = None) -> str:
    """Experiment id of ``name`` in the store at ``tracking_uri``, creating it if missing.

    The experiment is tagged as model development (``mlflow.experimentKind``, see tracking/datasets.py)
    so the MLflow UI opens it in its training view. Call this ONCE in the driver (concurrent creation from
    trials races on the store's unique constraint); a lost race is still handled by reading the experiment
    back. A deleted experiment of that name is a ValueError (restore or purge it, or choose another name).
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not name or not isinstance(name, str):
        raise ValueError(f"experiment name must be a non-empty string, got {name!r}")
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = artifact_location or default_artifact_location(tracking_uri)
        try:
            return client.create_experiment(name, artifact_location=location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment {name!r} in {tracking_uri} is deleted; restore it or pick another name"
        )
    set_experiment_kind(client, exp.experiment_id)  # experiments made before the tag existed
    return exp.experiment_id


def git_commit(path: str | os.PathLike[str] | None = None) -> str:
    """``git rev-parse HEAD`` of the repository holding ``path`` (default: this package), with ``-dirty`` if
    tracked files are modified; 'unknown' outside a git checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not head:
        return "unknown"
    return head + ("-dirty" if dirty else "")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {"a.b": "value"} with str values (MLflow param values are strings, <= 6000 chars)."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = str(value)
            limit = MAX_PARAM_VAL_LENGTH
            out[name] = text if len(text) <= limit else text[: limit - 3] + "..."
    return out


def log_metrics(
    tracking_uri: str, run_id: str, metrics: Mapping[str, float], *, step: int | None = None
) -> None:
    """Log scalar metrics to an existing run in one batch (used by rank 0 of the training loop)."""
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    now = int(time.time() * 1000)
    batch = [
        Metric(key=k, value=float(v), timestamp=now, step=int(step or 0))
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    MlflowClient(tracking_uri=tracking_uri).log_batch(run_id, metrics=batch)


def log_params(tracking_uri: str, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Log a nested mapping as flat params (in batches of 100); returns what was logged."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    flat = flatten_params(params)
    client = MlflowClient(tracking_uri=tracking_uri)
    items = [Param(k, v) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    return flat


def run_params(run_id: str, tracking_uri: str) -> dict[str, str]:
    """Params already on a run (used on resume: MLflow refuses to change a logged param)."""
    from mlflow.tracking import MlflowClient

    return dict(MlflowClient(tracking_uri=tracking_uri).get_run(run_id).data.params)


def metric_history(tracking_uri: str, run_id: str, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
    """{key: [(step, value), ...]} sorted by step, for the curve plots."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


@contextmanager
def use_tracking_uri(tracking_uri: str) -> Iterator[str]:
    """Temporarily point MLflow's fluent API (``mlflow.start_run``, ``mlflow.pytorch.log_model`` /
    ``load_model`` of ``models:/`` and ``runs:/`` URIs) at ``tracking_uri``; restores the previous URI and the
    ``MLFLOW_TRACKING_URI`` environment variable (which ``mlflow.set_tracking_uri`` also sets) afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as _utils

    old_uri = getattr(_utils, "_tracking_uri", None)
    old_env = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        mlflow.set_tracking_uri(tracking_uri)
        yield tracking_uri
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
