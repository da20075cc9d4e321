"""Workspace file access cannot be made to wait: the checks that close the race between
``lstat`` and ``open``, and a lease (which makes ``open`` wait for its holder) answered at once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.errors import ErrorCode, ToolFailed
from runtime.sandbox import workspace as ws_module
from runtime.sandbox.workspace import Workspace


@pytest.fixture
def ws(tmp_path):
    w = Workspace(tmp_path / "ws", size_mb=4)
    yield w
    w.remove()


@pytest.fixture
def swap_after_check(monkeypatch):
    """Replace the checked file with a FIFO right after ``lstat`` saw a regular file: the race a
    sandbox process could win, made to happen every time."""
    real = ws_module._lstat

    def lstat_then_swap(d: int, name: str, **kw):
        st = real(d, name, **kw)
        os.unlink(name, dir_fd=d)
        os.mkfifo(name, dir_fd=d)
        return st

    monkeypatch.setattr(ws_module, "_lstat", lstat_then_swap)


def test_fifo_swapped_in_before_a_read_is_refused_without_blocking(ws, swap_after_check):
    (ws.root / "f").write_text("regular when checked")
    with pytest.raises(ToolFailed) as info:
        ws.read("/workspace/f", 100)
    assert info.value.code is ErrorCode.TOOL_FAILED and "is a fifo" in info.value.reason


def test_fifo_swapped_in_before_a_write_is_refused_without_blocking(ws, swap_after_check):
    (ws.root / "f").write_text("regular when checked")
    with pytest.raises(ToolFailed) as info:  # no reader: the non-blocking open fails with ENXIO
        ws.write("/workspace/f", b"data")
    assert "cannot be opened without blocking" in info.value.reason


def test_fifo_with_a_reader_swapped_in_before_a_write_gets_nothing(ws, monkeypatch):
    (ws.root / "f").write_text("regular when checked")
    real, reader = ws_module._lstat, []

    def lstat_then_swap(d: int, name: str, **kw):
        st = real(d, name, **kw)
        os.unlink(name, dir_fd=d)
        os.mkfifo(name, dir_fd=d)
        reader.append(os.open(name, os.O_RDONLY | os.O_NONBLOCK, dir_fd=d))  # somebody is listening
        return st

    monkeypatch.setattr(ws_module, "_lstat", lstat_then_swap)
    with pytest.raises(ToolFailed) as info:
        ws.write("/workspace/f", b"data")
    assert "is a fifo" in info.value.reason
    assert os.read(reader[0], 10) == b""  # the worker opened and closed its end, and wrote nothing
    os.close(reader[0])


HOLD_LEASE = """
import fcntl, os, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # a lease holder that never gives the file up
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.fcntl(fd, 1024, fcntl.F_WRLCK)  # F_SETLEASE
print("held", flush=True)
sys.stdin.read()
"""


def test_a_file_under_a_lease_is_refused_at_once(ws):
    """A blocking open would wait for the holder to give the lease up, or for the kernel's
    lease-break-time (45 s by default)."""
    path = ws.root / "leased"
    path.write_text("x")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        for attempt in (lambda: ws.read("/workspace/leased", 10), lambda: ws.write("/workspace/leased", b"y")):
            with pytest.raises(ToolFailed) as info:
                attempt()
            assert "cannot be opened without blocking" in info.value.reason
    finally:
        holder.stdin.close()
        holder.wait()
    assert ws.read("/workspace/leased", 10) == b"x"  # the holder is gone: the file reads again


def test_a_write_replaces_a_longer_file(ws):
    (ws.root / "f").write_text("a much longer text")
    assert ws.write("/workspace/f", b"short") == 5
    assert (ws.root / "f").read_bytes() == b"short"


def test_listing_reports_what_each_entry_is_and_opens_none(ws):
    os.mkfifo(ws.root / "p")
    (ws.root / "d").mkdir()
    os.symlink("/etc/passwd", ws.root / "l")
    (ws.root / "f").write_text("x")
    assert {e["name"]: e["type"] for e in ws.list("/workspace")} == {"p": "fifo", "d": "dir", "l": "link",
                                                                     "f": "file"}
    with pytest.raises(ToolFailed):
        ws.list("/workspace/p")
    assert Path(ws.root / "p").is_fifo()
