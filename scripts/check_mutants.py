#!/usr/bin/env python
"""Do the tests bite? Run each test against a deliberately broken variant of the code (a "mutant").

Each mutant in scripts/mutants/mutants.json names a patch (a minimal bug, made with ``git diff`` against the
commit it was written for) and/or an environment change, what it breaks, and the test node ids that must
catch it. For each mutant this script resets one scratch clone of the repository (``git clone`` of this
checkout's HEAD, reused: ``git checkout -- .`` and ``git clean`` between mutants), applies the patch, runs
``python -m pytest -x -q <tests>`` from inside the clone (the clone's package first on PYTHONPATH, so the
patched code is what the tests import; DEEPLENSE_ALLOW_MISSING_REFERENCES unset) and records the outcome:

- ``caught``: the tests FAILED (exit status 1, or for a mutant with ``expect_output`` any non-zero status
  whose output holds that text): the wanted outcome;
- ``NOT caught``: the tests passed on the broken code;
- ``patch does not apply``: the code moved on since the patch was made (remake it);
- ``error``: anything else (tests not found, a crash of pytest itself, a time-out).

With ``--baseline`` the same tests first run on the unbroken clone, where they must pass (else the row is
``baseline fails``): a mutant is only evidence if its tests pass without it.

    python scripts/check_mutants.py                 # every mutant; table + scripts/mutants/results.json
    python scripts/check_mutants.py --list
    python scripts/check_mutants.py --only snr_off_by_10pct --only f_sub_off_by_10pct --baseline
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTANTS_DIR = REPO / "scripts" / "mutants"
INDEX = MUTANTS_DIR / "mutants.json"
RESULTS = MUTANTS_DIR / "results.json"
DEFAULT_CLONE = Path("/tmp/mut")
DROP_ENV = ("DEEPLENSE_ALLOW_MISSING_REFERENCES", "PYTEST_ADDOPTS", "PYTHONPATH")


def load_index(path: Path = INDEX) -> list[dict]:
    mutants = json.loads(path.read_text())
    names = [m["name"] for m in mutants]
    if len(set(names)) != len(names):
        raise SystemExit(f"{path}: duplicate mutant names")
    for m in mutants:
        if not m.get("tests") or not (m.get("patch") or m.get("env")):
            raise SystemExit(f"{path}: mutant {m['name']!r} needs tests and a patch or an env")
    return mutants


def git(clone: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(clone), *args], capture_output=True, text=True, check=check)


def fresh_clone(clone: Path) -> str:
    """A clone of this checkout's HEAD at ``clone`` (made again from scratch); returns its commit."""
    if clone.exists():
        shutil.rmtree(clone)
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    return git(clone, "rev-parse", "HEAD").stdout.strip()


def reset(clone: Path) -> None:
    git(clone, "checkout", "-q", "--", ".")
    git(clone, "clean", "-fdq")


def mutant_env(mutant: dict, clone: Path) -> dict[str, str]:
    """The tests' environment: this one without DROP_ENV, the clone first on PYTHONPATH, then the mutant's
    own variables (relative PYTHONPATH entries are relative to this checkout: the stubs live here)."""
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    paths = [str(clone)]
    for key, value in (mutant.get("env") or {}).items():
        if key == "PYTHONPATH":
            paths = [str(REPO / p) if not os.path.isabs(p) else p for p in value.split(os.pathsep)] + paths
        else:
            env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_tests(mutant: dict, clone: Path, python: str, timeout: float) -> tuple[int | None, str, float]:
    """(exit status or None on a time-out, output tail, seconds) of the mutant's tests in ``clone``."""
    # --show-capture=no: captured logs (MLflow, Ray) would crowd the traceback out of the kept tail
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", "--tb=short",
           "--show-capture=no", *mutant["tests"]]  # fmt: skip
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=clone, env=mutant_env(mutant, clone), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return None, out[-3000:], time.monotonic() - t0
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:], time.monotonic() - t0


def classify(mutant: dict, rc: int | None, output: str) -> str:
    if rc is None:
        return "error: timed out"
    expect = mutant.get("expect_output")
    if expect:
        if rc != 0 and expect in output:
            return "caught"
        return "NOT caught" if rc == 0 else f"error: exit {rc} without {expect!r}"
    if rc == 1:
        return "caught"
    if rc == 0:
        return "NOT caught"
    return f"error: pytest exit {rc}"


def reason(output: str) -> str:
    """The first error line of a pytest output (``E   ...``, else ``ERROR: ...``), for the record."""
    for line in output.splitlines():
        if (line.startswith("E ") and line[2:].strip()) or line.startswith("ERROR:"):
            return line[:300].strip()
    return ""


def check_one(mutant: dict, clone: Path, python: str, timeout: float, baseline: bool) -> dict:
    row = {"name": mutant["name"], "broken": mutant["broken"], "tests": mutant["tests"]}
    reset(clone)
    if baseline:
        rc, out, secs = run_tests({**mutant, "env": None}, clone, python, timeout)
        row["baseline"] = {"exit": rc, "seconds": round(secs, 1)}
        if rc != 0:
            row.update(outcome="baseline fails", seconds=0.0, tail=out)
            return row
    if mutant.get("patch"):
        patch = MUTANTS_DIR / mutant["patch"]
        applied = git(clone, "apply", str(patch), check=False)
        if applied.returncode != 0:
            row.update(outcome="patch does not apply", seconds=0.0, tail=applied.stderr[-2000:])
            return row
    rc, out, secs = run_tests(mutant, clone, python, timeout)
    row.update(outcome=classify(mutant, rc, out), exit=rc, seconds=round(secs, 1))
    row.update(reason=reason(out), tail=out)
    reset(clone)
    return row


def table(rows: list[dict]) -> str:
    def short(tests: list[str]) -> str:
        return ", ".join(t.split("::", 1)[-1] if "::" in t else t for t in tests)

    head = ("mutant", "what is broken", "tests", "outcome", "s")
    lines = [head] + [(r["name"], r["broken"], short(r["tests"]), r["outcome"], f"{r['seconds']:.0f}")
                      for r in rows]  # fmt: skip
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(cells) + " |" for cells in lines[1:]]
    return "\n".join(out)


def write_results(path: Path, rows: list[dict], *, partial: bool) -> None:
    """Write ``rows`` to ``path``; a partial run (--only) replaces its mutants' rows and keeps the others."""
    if partial and path.exists():
        new = {r["name"]: r for r in rows}
        old = json.loads(path.read_text()).get("results", [])
        rows = [new.pop(r["name"], r) for r in old] + list(new.values())
    order = {m["name"]: i for i, m in enumerate(load_index())}
    rows = sorted(rows, key=lambda r: order.get(r["name"], len(order)))
    caught = sum(r["outcome"] == "caught" for r in rows)
    path.write_text(json.dumps({"caught": caught, "mutants": len(rows), "results": rows}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    ap.add_argument("--baseline", action="store_true", help="first run the tests unbroken")
    ap.add_argument("--clone", type=Path, default=DEFAULT_CLONE, help=f"scratch clone ({DEFAULT_CLONE})")
    ap.add_argument("--python", default=str(REPO / ".venv" / "bin" / "python"), help="interpreter for pytest")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per pytest run")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"JSON results (default {RESULTS})")
    args = ap.parse_args(argv)

    mutants = load_index()
    if args.list:
        for m in mutants:
            kind = "patch " + m["patch"] if m.get("patch") else "env " + json.dumps(m["env"])
            print(f"{m['name']}: {m['broken']}\n    {kind}\n    tests: {' '.join(m['tests'])}")
        return 0
    if args.only:
        unknown = set(args.only) - {m["name"] for m in mutants}
        if unknown:
            print(f"unknown mutant(s): {', '.join(sorted(unknown))}; --list names them", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m["name"] in args.only]

    commit = fresh_clone(args.clone)
    rows = []
    try:
        for m in mutants:
            row = check_one(m, args.clone, args.python, args.timeout, args.baseline)
            rows.append(row)
            print(f"{row['name']}: {row['outcome']} ({row['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(args.clone, ignore_errors=True)
    print()
    print(table(rows))
    finished = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for row in rows:
        row.update(commit=commit, finished=finished)
    write_results(args.out, rows, partial=bool(args.only))
    print(f"\nwrote {args.out}")
    caught = sum(r["outcome"] == "caught" for r in rows)
    print(f"{caught} of {len(rows)} mutants caught")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
