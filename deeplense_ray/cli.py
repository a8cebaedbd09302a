"""What every job's ``main`` shares: the failures a user causes become exit status 2 and one line.

:func:`run_main` runs a job's ``main(argv)``; an exception that :func:`error_message` recognises as the
user's (a bad value, a missing or unreadable file, an HDF5 file that is not one, a refused unpickling, an
MLflow store that refuses or does not answer, a Ray cluster that does not answer, a dependency this Python
cannot import, and any of these raised inside a Ray task, actor or Train worker) is printed as
``error: <message>`` on stderr and the job returns :data:`EXIT_BAD_INPUT`. Anything else
(``AttributeError``, ``TypeError``, ... inside the library: a bug) keeps its traceback.

:func:`count_arg` is the argparse type of a count flag (``--num-per-class 1e6`` is one million;
``-5`` or ``1.5`` is refused naming the value, before any other check).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable, Sequence

EXIT_BAD_INPUT = 2

#: Exception types a user causes (besides MLflow's and Ray's own, matched by name below so that this leaf
#: module imports neither).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # bad values; also RayConnectError's callers and the library's own checks
    KeyError,
    OSError,  # missing / unreadable files, h5py's "Unable to open file", disk full, refused connections
    pickle.UnpicklingError,
    EOFError,  # a truncated pickle or .npy file
)
#: ``module.Class`` names of user-caused errors from libraries imported lazily.
USER_ERROR_NAMES = (
    "mlflow.exceptions.MlflowException",
    "deeplense_ray.runtime.RayConnectError",
)
#: How deep :func:`root_cause` follows wrapped errors.
_MAX_DEPTH = 16


def _names(exc: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}


def _is_ray_wrapper(exc: BaseException) -> bool:
    """A Ray error that only carries another one: a failed task or actor (RayTaskError, RayActorError with a
    cause), a Ray Data UserCodeException, a Ray Train worker-group or training failure."""
    names = {n.rsplit(".", 1)[-1] for n in _names(exc) if n.startswith("ray.")}
    return bool(names & {"RayTaskError", "UserCodeException", "WorkerGroupError", "TrainingFailedError"})


def _wrapped(exc: BaseException) -> BaseException | None:
    """The exception a Ray wrapper carries (its ``cause``, a worker failure, or ``__cause__``)."""
    for attr in ("cause", "controller_failure"):
        cause = getattr(exc, attr, None)
        if isinstance(cause, BaseException) and cause is not exc:
            return cause
    failures = getattr(exc, "worker_failures", None)  # Ray Train: {rank: exception}
    if isinstance(failures, dict) and failures:
        first = failures[min(failures)]
        if isinstance(first, BaseException):
            return first
    return exc.__cause__


def root_cause(exc: BaseException) -> BaseException:
    """``exc`` with the Ray wrappers around it removed (a RayTaskError's cause, recursively)."""
    seen = 0
    while _is_ray_wrapper(exc) and seen < _MAX_DEPTH:
        inner = _wrapped(exc)
        if inner is None:
            break
        exc, seen = inner, seen + 1
    return exc


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` (already unwrapped) is a failure the user causes, not a bug in the library."""
    if isinstance(exc, (AttributeError, TypeError, NameError, ImportError, AssertionError)):
        return False
    return isinstance(exc, USER_ERRORS) or bool(_names(exc) & set(USER_ERROR_NAMES))


def _text(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])  # str(KeyError) wraps its message in quotes
    message = getattr(exc, "message", None)  # MlflowException: without the error-code prefix
    if "mlflow" in type(exc).__module__ and isinstance(message, str) and message:
        return message
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in str(exc):
        return f"{exc} ({exc.filename})"
    return str(exc) or type(exc).__name__


def missing_dependency(exc: BaseException) -> str | None:
    """The line for a third-party module that this Python cannot import (the job runs under another
    interpreter than the project's virtualenv, e.g. a bare ``python`` in ``ray job submit``), else None."""
    name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
    if not name or name.split(".")[0] == "deeplense_ray":
        return None
    return (
        f"{exc} in {sys.executable}: this Python lacks the project's dependencies; run the job with the "
        "virtualenv's python (.venv/bin/python, or `source .venv/bin/activate` first; for `ray job submit`, "
        "before `ray start`)"
    )


def error_message(exc: BaseException) -> str | None:
    """The one line to print for a user-caused failure (Ray wrappers removed, the file named where the
    error knows it), or None when ``exc`` is not one (a bug: let its traceback show)."""
    cause = root_cause(exc)
    missing = missing_dependency(cause)
    if missing is not None:
        return missing
    if not is_user_error(cause):
        return None
    lines = [ln.strip() for ln in _text(cause).strip().splitlines() if ln.strip()]
    return " ".join(lines) if len(lines) <= 3 else lines[0]


def run_main(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)``; a user-caused failure prints ``error: <message>``, returns :data:`EXIT_BAD_INPUT`."""
    try:
        return main(argv)
    except Exception as exc:  # noqa: BLE001 - sorted below: only user-caused errors are caught
        message = error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


def count_arg(text: str) -> int:
    """argparse type of a count: a whole number >= 1, written as ``1000``, ``1_000`` or ``1e3``."""
    s = str(text).strip().replace("_", "")
    try:
        value = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not f.is_integer():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        value = int(f)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value
