"""TCP ports for the servers the tests start (Ray heads, MLflow, SLURM daemons).

Binding port 0 hands out a port from the kernel's ephemeral range, which the kernel also gives to outgoing
connections: another process can take it between the pick and the server's bind, and two picks in one
process can return the same port. The ports here are drawn at random from a range *below* the ephemeral
range (no outgoing connection is ever given one of them), checked free by binding, and not handed out twice
within one process while others are left (single ports come from the lower quarter of the range and blocks
from the rest, so single ports never split the blocks; once every port was handed out, one handed out before
and free again is reused). A port can still be taken by another process between the check and the server's
bind, so a fixture that starts a server on one retries with fresh ports when the server fails to bind.
"""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

#: The lowest port handed out (below: well-known services and their habits, 8000, 8080, 5000, ...).
LOW = 20000
#: The least room wanted below the ephemeral range before using the room above it instead.
_MIN_ROOM = 2000
_EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")

_handed: set[int] = set()
_lock = threading.Lock()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's ephemeral port range (inclusive), Linux's default if it cannot be read."""
    try:
        lo, hi = (int(x) for x in _EPHEMERAL_FILE.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def port_range() -> tuple[int, int]:
    """``[lo, hi)`` the ports are drawn from: LOW up to the ephemeral range's start, or the room above its
    end where a system's ephemeral range starts too low to leave room below."""
    eph_lo, eph_hi = ephemeral_range()
    if eph_lo - LOW >= _MIN_ROOM:
        return LOW, eph_lo
    if 65536 - (eph_hi + 1) >= _MIN_ROOM:
        return eph_hi + 1, 65536
    raise RuntimeError(f"no room for test ports outside the ephemeral range {eph_lo}-{eph_hi}")


def _bind(port: int) -> socket.socket:
    """A socket bound to ``port`` on every IPv4 address (so any listener on the port makes it fail)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("0.0.0.0", port))
    except OSError:
        s.close()
        raise
    return s


def is_free(port: int) -> bool:
    """True if ``port`` can be bound right now."""
    try:
        _bind(port).close()
    except OSError:
        return False
    return True


def _bounds(lo: int | None, hi: int | None, *, block: bool) -> tuple[int, int]:
    """``[lo, hi)``, by default: single ports in the lower quarter of :func:`port_range`, blocks above it."""
    dlo, dhi = port_range()
    cut = dlo + (dhi - dlo) // 4
    d = (cut, dhi) if block else (dlo, cut)
    return (d[0] if lo is None else lo), (d[1] if hi is None else hi)


def free_port(*, lo: int | None = None, hi: int | None = None) -> int:
    """A port in ``[lo, hi)`` (default: the lower quarter of :func:`port_range`) that is free now, one this
    process has not handed out before while there is one. RuntimeError if every port there is taken."""
    lo, hi = _bounds(lo, hi, block=False)
    with _lock:
        fresh = [p for p in range(lo, hi) if p not in _handed]
        used = [p for p in range(lo, hi) if p in _handed]
        random.shuffle(fresh)
        random.shuffle(used)
        for port in fresh + used:  # a port handed out before only once no fresh one is free
            if is_free(port):
                _handed.add(port)
                return port
    raise RuntimeError(f"no free port in [{lo}, {hi})")


def free_ports(n: int, **bounds: int | None) -> list[int]:
    """``n`` distinct ports, as :func:`free_port` draws them."""
    return [free_port(**bounds) for _ in range(n)]


def free_port_block(
    size: int, *, lo: int | None = None, hi: int | None = None, step: int | None = None
) -> int:
    """A port ``p`` such that ``p .. p+size-1`` are all free now (bound together to check), preferring blocks
    none of whose ports this process handed out before; all of them are handed out now.

    ``p`` is ``lo`` plus a multiple of ``step`` (default ``size``), tried in random order: blocks of one size
    either coincide or do not overlap, so processes drawing at the same time rarely collide."""
    lo, hi = _bounds(lo, hi, block=True)
    step = step or size
    with _lock:
        bases = list(range(lo, hi - size + 1, step))
        fresh = [b for b in bases if not _handed.intersection(range(b, b + size))]
        used = [b for b in bases if _handed.intersection(range(b, b + size))]
        random.shuffle(fresh)
        random.shuffle(used)
        for base in fresh + used:  # a block with ports handed out before only once no fresh one is free
            held: list[socket.socket] = []
            try:
                for port in range(base, base + size):
                    held.append(_bind(port))
            except OSError:
                continue
            finally:
                for s in held:
                    s.close()
            _handed.update(range(base, base + size))
            return base
    raise RuntimeError(f"no block of {size} free ports in [{lo}, {hi})")


def address_in_use(log_text: str) -> bool:
    """True if a server's log says it could not bind its address (EADDRINUSE, as Python, uvicorn, gunicorn
    and Ray's daemons word it)."""
    text = log_text.lower()
    return any(s in text for s in ("address already in use", "errno 98", "connection in use", "eaddrinuse"))
