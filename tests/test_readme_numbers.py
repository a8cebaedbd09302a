"""Every number README.md and docs/benchmarks.md publish is rendered from a named key of a JSON file.

benchmarks/report.py holds the spec (section, table, row: file, key path, format) and renders
docs/benchmarks.md and README's results block from benchmarks/results/*.json. These tests check that
(a) the committed page and block equal what the JSON files render (`report.py --check`), (b) each rendered
number lies where that comparison sees it, so a number edited by hand fails, and (c) no other digit is
typed in the prose or tables of either file (code, links and the Python version aside).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


report = _load_report()
_MARKED = re.compile(re.escape(report.MARK_OPEN) + r"(.*?)" + re.escape(report.MARK_CLOSE), re.S)


def traced(path: Path) -> str:
    """The file as the spec renders it, every rendered number between trace marks."""
    if path == report.PAGE:
        return report.render_page(trace=True)
    return report.readme_with_block(path.read_text(), report.render_readme_block(trace=True))


def rendered_spans(path: Path) -> list[tuple[int, int]]:
    """(start, end) in the plain file of every number the spec rendered."""
    spans, shift = [], 0
    for m in _MARKED.finditer(traced(path)):
        start = m.start() - shift
        spans.append((start, start + len(m.group(1))))
        shift += len(report.MARK_OPEN) + len(report.MARK_CLOSE)
    return spans


_IDENTIFIER = re.compile(r"(?<![\w.])[A-Za-z_][\w\-]*")  # ResNet18, H200, bf16, model_ii, Fletcher-32
_NOT_A_NAME = re.compile(r"x[\d.]+")  # a scale or ratio typed as a word ("x0.5") is a number
_ALLOWED = [
    re.compile(r"```.*?```", re.S),  # code blocks
    re.compile(r"`[^`]+`"),  # code spans (a span may wrap a line): commands, flags, file names
    re.compile(r"\]\([^)]*\)"),  # link and image targets
    re.compile(r"<!--.*?-->", re.S),
    re.compile(r"\bPython \d+\.\d+"),
]


def typed_numbers(text: str) -> list[str]:
    """Digits in ``text`` outside code, links, identifiers and the allowed version, with their context."""
    original = text

    def blank(m: re.Match) -> str:  # same length, so positions still point into the original text
        return " " * len(m.group(0))

    for pattern in _ALLOWED:
        text = pattern.sub(blank, text)
    text = _IDENTIFIER.sub(lambda m: m.group(0) if _NOT_A_NAME.fullmatch(m.group(0)) else blank(m), text)
    found = re.finditer(r"\d", text)
    return [original[max(0, m.start() - 40) : m.end() + 20].replace("\n", " ") for m in found]


@pytest.mark.parametrize("path", [report.PAGE, report.README], ids=["benchmarks.md", "README.md"])
def test_committed_file_equals_what_the_json_files_render(path):
    current = path.read_text()
    assert not report.is_stale(path, current), (
        f"{path.relative_to(ROOT)} differs from what benchmarks/results/*.json render: "
        "run python benchmarks/report.py (never edit the numbers by hand)")


def test_report_check_command_passes():
    proc = subprocess.run([sys.executable, "benchmarks/report.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("path", [report.PAGE, report.README], ids=["benchmarks.md", "README.md"])
def test_every_rendered_number_edited_by_hand_fails_the_check(path):
    """Change the last digit of each rendered number in turn: the check must call the file stale."""
    current = path.read_text()
    spans = [(a, b) for a, b in rendered_spans(path) if re.search(r"\d", current[a:b])]  # not names, "met"
    assert len(spans) >= (300 if path == report.PAGE else 8)
    unnoticed = []
    for start, end in spans:
        number = current[start:end]
        digits = [i for i, ch in enumerate(number) if ch.isdigit()]
        i = start + digits[-1]
        edited = current[:i] + str((int(current[i]) + 1) % 10) + current[i + 1:]
        if not report.is_stale(path, edited):
            unnoticed.append(number)
    assert not unnoticed, f"hand edits of these numbers in {path.name} pass the check: {unnoticed[:10]}"


@pytest.mark.parametrize("path", [report.PAGE, report.README], ids=["benchmarks.md", "README.md"])
def test_no_number_is_typed_by_hand(path):
    """Prose, labels and headers hold no digits: a number on these pages comes from a JSON key."""
    text = _MARKED.sub(lambda m: " " * len(m.group(0)), traced(path))
    found = typed_numbers(text)
    assert not found, f"{path.name}: numbers not rendered from a JSON key: {found[:10]}"


def test_typed_numbers_finds_numbers_and_skips_names():
    assert typed_numbers("ResNet18 on one H200 in bf16, `--epochs 10`, Python 3.10, [x](a1.png)") == []
    for text in ("AUC 0.93", "a 2-core CPU", "1.8x faster", "x0.25", "64x64 images", "-0.9 slope", "12,319"):
        assert typed_numbers(text), text


def test_a_missing_key_names_the_file_and_the_path():
    data = {"runs": [{"model": "ViT", "wall_s": 1.0}]}
    assert report.lookup(data, "runs[model=ViT].wall_s", "x.json") == 1.0
    with pytest.raises(KeyError, match=r"x\.json.*runs\[model=CvT\]"):
        report.lookup(data, "runs[model=CvT].wall_s", "x.json")
    with pytest.raises(KeyError, match="x.json"):
        report.lookup(data, "runs[0].no_such_key", "x.json")


def test_the_page_cites_only_files_that_exist():
    cited = set(re.findall(r"benchmarks/results/([\w.\-]+\.json)", report.PAGE.read_text()))
    assert cited and all((report.RESULTS / name).is_file() for name in cited), cited
