"""What a request needs on disk or in memory, against what this machine has: checked before Ray starts.

A count typed wrong (``--num-per-class 1e12``, ``--val-size 1e9``) must end the job at once with one line that
names the size needed and the room there is, not with an out-of-memory error or a full disk after the cluster
started. Leaf module: the standard library only; callers compute the sizes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``16.0 KiB``, ``17.5 TiB``."""
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def nearest_existing_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` or its nearest parent that exists (where a directory to be made would live)."""
    p = Path(path).expanduser().absolute()
    while not p.is_dir() and p != p.parent:
        p = p.parent
    return p


def physical_memory() -> int:
    """Bytes of physical memory of this machine (0 where the system does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def check_disk_room(path: str | os.PathLike[str], need: int, *, what: str, reclaimable: int = 0) -> None:
    """ValueError when ``need`` bytes (``what`` says of what and from which flag) exceed the free space of the
    file system that holds ``path`` (its nearest existing parent) plus ``reclaimable`` bytes already there
    that the job replaces."""
    where = nearest_existing_dir(path)
    free = shutil.disk_usage(where).free
    if need > free + reclaimable:
        kept = f" (+ {format_bytes(reclaimable)} of files it replaces)" if reclaimable else ""
        on = f"{path}" if Path(path).absolute() == where else f"{path} (nearest existing: {where})"
        raise ValueError(
            f"{what} needs at least {format_bytes(need)} on disk, but the file system of {on} has "
            f"{format_bytes(free)} free{kept}"
        )


def check_memory_room(need: int, *, what: str) -> None:
    """ValueError when ``need`` bytes held in memory at once (``what`` says of what and from which flag)
    exceed this machine's physical memory."""
    have = physical_memory()
    if have and need > have:
        raise ValueError(
            f"{what} needs {format_bytes(need)} in memory at once, more than this machine's "
            f"{format_bytes(have)}"
        )
