"""Every number README's Results tables quote must come from a JSON file in benchmarks/results.

Each table in README's "## Results" section names its JSON files in the paragraph above it (or in its own
cells) as `benchmarks/results/NAME.json` or `NAME.json` (globs such as `train_scaling_*.json` allowed). Every
number in a result cell (all columns but the first, which names the configuration) must equal some number of
those files at the precision shown: "262k" matches 262286.5, "5.1%" matches 0.0508, "24,911" matches 24911.45.
A number typed by hand, or left over from a run whose JSON was not kept, fails this test.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

_JSON_REF = re.compile(r"([A-Za-z0-9_.*\-]+\.json)")
# a number as README writes it: sign, digits with thousands commas, decimals, a k/M multiplier, a unit
_NUMBER = re.compile(
    r"(?<![\w.])(-?\d{1,3}(?:,\d{3})+|-?\d+(?:\.\d+)?)(?![\d.])"
    r"(?:\s?(k|M)(?![A-Za-z]))?\s*(%|x(?![A-Za-z\d])|ms(?![A-Za-z]))?"
)
_MULT = {None: 1.0, "k": 1e3, "M": 1e6}


def results_section(text: str) -> str:
    start = text.index("\n## Results")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def tables_with_context(section: str) -> list[tuple[str, list[str]]]:
    """(text since the previous table, table lines) for every Markdown table of the section."""
    out, context, table = [], [], []
    for line in section.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out.append(("\n".join(context), table))
            context, table = [], []
        context.append(line)
    if table:
        out.append(("\n".join(context), table))
    return out


def cited_files(text: str) -> list[Path]:
    files: list[Path] = []
    for ref in _JSON_REF.findall(text):
        name = ref.split("/")[-1]
        files.extend(sorted(RESULTS.glob(name)))
    return sorted(set(files))


def json_numbers(obj) -> list[float]:
    if isinstance(obj, bool) or obj is None:
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)] if math.isfinite(obj) else []
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in json_numbers(v)]
    if isinstance(obj, (list, tuple)):
        return [x for v in obj for x in json_numbers(v)]
    return []


def quoted_numbers(cell: str) -> list[tuple[str, float, float, str | None]]:
    """(as written, value, half a unit of the last digit shown, unit) for every number in a table cell."""
    cell = re.sub(r"`[^`]*`", " ", cell)  # file names and code are not results
    out = []
    for m in _NUMBER.finditer(cell):
        mantissa, mult, unit = m.group(1), m.group(2), m.group(3)
        digits = mantissa.replace(",", "")
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        scale = _MULT[mult]
        out.append((m.group(0).strip(), float(digits) * scale, 0.5 * 10.0**-decimals * scale, unit))
    return out


def matches(value: float, half_ulp: float, unit: str | None, candidates: list[float]) -> bool:
    factors = (1.0, 100.0) if unit == "%" else (1.0,)
    tol = half_ulp * (1 + 1e-9) + 1e-12
    return any(abs(x * f - value) <= tol for x in candidates for f in factors)


def _tables():
    text = (ROOT / "README.md").read_text()
    return tables_with_context(results_section(text))


def test_results_section_has_tables():
    assert len(_tables()) >= 3


@pytest.mark.parametrize("index", range(len(_tables())))
def test_every_table_number_is_in_its_json(index):
    context, table = _tables()[index]
    files = cited_files(context + "\n" + "\n".join(table))
    assert files, f"README Results table {index} ({table[0][:80]}...) names no JSON in benchmarks/results"
    candidates = [x for f in files for x in json_numbers(json.loads(f.read_text()))]
    missing = []
    for row in table[2:]:  # header and separator rows carry no results
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        for cell in cells[1:]:
            for written, value, half_ulp, unit in quoted_numbers(cell):
                if not matches(value, half_ulp, unit, candidates):
                    missing.append(f"{written!r} in row {cells[0]!r}")
    names = ", ".join(f.name for f in files)
    assert not missing, f"README numbers not found in {names}: " + "; ".join(missing)


def test_the_check_catches_a_number_typed_by_hand():
    """The matcher itself: a changed digit, a wrong multiplier or a wrong percentage must not match."""
    candidates = [262286.5, 0.0508, 24911.45, 1.9592]
    assert matches(*_one("262k"), candidates) and matches(*_one("5.1%"), candidates)
    assert matches(*_one("24,911"), candidates) and matches(*_one("1.96x"), candidates)
    for typed in ("263k", "262M", "5.2%", "24,912", "1.97x", "341k"):
        assert not matches(*_one(typed), candidates), typed


def _one(cell: str):
    (written, value, half_ulp, unit), = quoted_numbers(cell)
    return value, half_ulp, unit
