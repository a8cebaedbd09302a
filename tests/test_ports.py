"""tests/_ports.py: ports below the ephemeral range, free when handed out, not handed out twice while others
are left."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ports  # noqa: E402


def test_ports_never_repeat_and_stay_below_the_ephemeral_range():
    eph_lo, eph_hi = _ports.ephemeral_range()
    lo, hi = _ports.port_range()
    if lo > eph_hi:
        pytest.skip(f"this system's ephemeral range starts at {eph_lo}: ports are drawn above it")
    assert hi <= eph_lo
    ports = _ports.free_ports(300)
    assert len(set(ports)) == len(ports)
    assert all(lo <= p < hi for p in ports)
    assert max(ports) < eph_lo
    base = _ports.free_port_block(50)
    block = set(range(base, base + 50))
    assert not block & set(ports)  # a block never reuses a single port handed out before
    assert not block & set(_ports.free_ports(100))  # nor is a block's port handed out again
    base2 = _ports.free_port_block(50)
    assert not block & set(range(base2, base2 + 50))


def test_a_blocks_ports_are_all_bindable_together():
    base = _ports.free_port_block(40)
    held = []
    try:
        for port in range(base, base + 40):
            s = socket.socket()
            held.append(s)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        for s in held:
            s.close()


def test_a_port_held_by_another_socket_is_never_returned():
    # A small window of ports: hold every other one (listening, as a server would), draw the rest.
    base = _ports.free_port_block(8, step=8)
    lo, hi = base, base + 8
    _ports._handed.difference_update(range(lo, hi))  # the block was only reserved to find free ports
    held = []
    try:
        for port in range(lo, hi, 2):
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        got = sorted(_ports.free_port(lo=lo, hi=hi) for _ in range(4))
        assert got == list(range(lo + 1, hi, 2))  # exactly the ports nobody holds
        # every free port of the window handed out: one of them is reused (free again), a held one never
        assert _ports.free_port(lo=lo, hi=hi) in got
        with pytest.raises(RuntimeError):  # no two adjacent ports are free
            _ports.free_port_block(2, lo=lo, hi=hi, step=1)
    finally:
        for s in held:
            s.close()
    # released: the ports never handed out come first, once each
    assert sorted(_ports.free_port(lo=lo, hi=hi) for _ in range(4)) == list(range(lo, hi, 2))


def test_a_suites_worth_of_ports_and_blocks_never_runs_out():
    """Hundreds of single ports do not split the blocks (they come from another part of the range), and more
    blocks than the range holds are handed out by reusing free ones (a whole suite draws that many)."""
    singles = set(_ports.free_ports(400))
    lo, hi = _ports.port_range()
    bases = [_ports.free_port_block(200) for _ in range((hi - lo) // 200 + 5)]
    assert not singles & {p for b in bases for p in range(b, b + 200)}


def test_address_in_use_messages():
    assert _ports.address_in_use("ERROR: [Errno 98] error while attempting to bind on address "
                                 "('127.0.0.1', 5000): address already in use")
    assert _ports.address_in_use("[ERROR] Connection in use: ('127.0.0.1', 5000)")
    assert not _ports.address_in_use("Uvicorn running on http://127.0.0.1:5000")
