#!/usr/bin/env python
"""Collect finished studies (``jobs/study.py``) into one JSON and one Markdown table beside published numbers.

Reads each study's ``study_runs.csv`` (one row per model x seed) and ``study_state.json`` (its settings) from
the study directory (or a copy of those two files), aggregates per model with the study's own report code
(mean +- sample std over seeds, :func:`deeplense_ray.study.report.aggregate`) and, for ``--protocol
lensiformer`` studies, puts the paper's single-run numbers beside them. Prints the table, writes both files.

    python benchmarks/study_summary.py STUDY_DIR [STUDY_DIR ...] --machine "one H200" \\
        --out benchmarks/results/lensiformer_protocol_h200.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from deeplense_ray.io import atomic_write_json, atomic_write_text  # noqa: E402
from deeplense_ray.study.report import RUNS_CSV, aggregate  # noqa: E402

STATE_FILE = "study_state.json"
#: the Lensiformer paper, Real-Galaxy-Tiny (1000/1000, 3000 epochs, AdamW lr 5e-7, one run each; PHYSICS.md)
PUBLISHED = {
    "lensiformer": {
        "Lensiformer": {"accuracy": 0.80, "auc": 0.865},
        "ViT": {"accuracy": 0.78, "auc": 0.841},
        "ViTSD": {"accuracy": 0.75, "auc": 0.819},
        "CvT": {"accuracy": 0.73, "auc": 0.796},
        "CaiT": {"accuracy": 0.71, "auc": 0.775},
    }
}
NUMERIC = ("accuracy", "auc_macro", "images_per_s", "params", "seed", "epochs")


def read_study(d: Path) -> dict[str, Any]:
    """Settings, runs and per-model aggregate of one study directory; ValueError naming a missing file."""
    for name in (RUNS_CSV, STATE_FILE):
        if not (d / name).is_file():
            raise ValueError(f"{d / name} does not exist: is {d} a finished study's directory?")
    state = json.loads((d / STATE_FILE).read_text())
    s = state["settings"]
    with open(d / RUNS_CSV, newline="") as fh:
        runs = []
        for r in csv.DictReader(fh):
            runs.append({k: (float(v) if (k in NUMERIC or k.startswith("auc_")) and v != "" else v)
                         for k, v in r.items() if k != "checkpoint"})  # fmt: skip
    class_names = sorted({k[4:] for r in runs for k in r if k.startswith("auc_") and k != "auc_macro"})
    models = [m for m in s["models"] if any(r["model"] == m for r in runs)]
    table = aggregate(runs, models, class_names)
    published = PUBLISHED.get(s.get("protocol") or "", {})
    for row in table:
        if row["model"] in published:
            row["published_accuracy"] = published[row["model"]]["accuracy"]
            row["published_auc"] = published[row["model"]]["auc"]
    return {"name": s["name"], "settings": s, "class_names": class_names, "runs": runs, "table": table}


def markdown(studies: list[dict[str, Any]]) -> str:
    lines = []
    for st in studies:
        s = st["settings"]
        lines += [
            f"### {st['name']}",
            "",
            f"{s.get('protocol') or 'study'}: {', '.join(s['models'])}; {s['seeds']} seeds, "
            f"{s['epochs']} epochs, train {json.dumps(s.get('train', {}))}, "
            f"preset overrides {json.dumps(s.get('preset_overrides', {}))}",
            "",
            "| model | params | accuracy | macro AUC | published accuracy / AUC | seeds |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in st["table"]:
            pub = (f"{r['published_accuracy']:.2f} / {r['published_auc']:.3f}"
                   if "published_auc" in r else "")  # fmt: skip
            lines.append(
                f"| {r['model']} | {r['params']:,} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | "
                f"{r['auc_macro_mean']:.3f} ± {r['auc_macro_std']:.3f} | {pub} | {r['n_seeds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("studies", nargs="+", help="study directories (with study_runs.csv, study_state.json)")
    ap.add_argument("--machine", required=True, help="where the studies ran, e.g. 'one H200'")
    ap.add_argument("--date", default=None, help="when (default: today)")
    ap.add_argument("--wall-s", default=None, help="comma-separated wall seconds of the studies, in order")
    ap.add_argument("--out", required=True, help="JSON file to write; the .md beside it")
    args = ap.parse_args(argv)
    try:
        studies = [read_study(Path(d)) for d in args.studies]
        walls = [float(w) for w in args.wall_s.split(",")] if args.wall_s else []
        if walls and len(walls) != len(studies):
            raise ValueError(f"--wall-s {args.wall_s!r}: {len(walls)} value(s) for {len(studies)} studies")
        for st, w in zip(studies, walls):
            st["wall_s"] = w
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    doc = {
        "benchmark": "study_summary",
        "machine": args.machine,
        "date": args.date or time.strftime("%Y-%m-%d"),
        "studies": studies,
    }
    atomic_write_json(out, doc)
    text = markdown(studies)
    atomic_write_text(out.with_suffix(".md"), text)
    print(text)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
