"""The worker reaps the orphans its sandboxes leave, and never a child someone waits for."""

from __future__ import annotations

import os
import select
import subprocess

from runtime.sandbox.base import REAPER, reap, spawn

from .harness import reaped_within, zombie_children



def exited(proc: subprocess.Popen[bytes]) -> None:
    """Block until ``proc`` is a zombie, without reaping it."""
    fd = os.pidfd_open(proc.pid)
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def test_an_orphan_comes_to_the_worker_and_is_reaped():
    REAPER.start()
    # A process in a session of its own (as a sandbox's is) starts a child and exits at once:
    # the child is an orphan, handed to this process (the subreaper), not to the host's pid 1.
    parent = subprocess.run(["setsid", "sh", "-c", "sleep 1 >/dev/null 2>&1 & echo $!"],
                            capture_output=True, text=True)
    orphan = int(parent.stdout)
    assert int(open(f"/proc/{orphan}/stat").read().rsplit(")", 1)[1].split()[1]) == os.getpid()
    assert reaped_within(lambda: not os.path.exists(f"/proc/{orphan}"), 30), "the orphan was never reaped"
    assert orphan not in zombie_children()


def test_a_spawned_process_keeps_its_exit_status():
    REAPER.start()
    proc = spawn(["sh", "-c", "exit 7"])
    exited(proc)
    REAPER.sweep()
    assert proc.pid in zombie_children()  # the reaper left it: it is ours to wait for
    assert reap(proc) is not None and proc.returncode == 7


def test_a_subprocess_of_the_worker_keeps_its_exit_status():
    REAPER.start()
    # A zombie of the worker's own session is left for ORPHAN_GRACE_S: subprocess.run reaps it first.
    for _ in range(20):
        REAPER.poke()
        assert subprocess.run(["sh", "-c", "exit 3"]).returncode == 3


def test_a_released_orphan_of_the_workers_own_session_is_reaped_without_the_grace():
    # gVisor's Sentry and gofer are orphans of this session that `runsc delete` kills and then waits
    # to see gone: released, they are reaped at the next sweep, not after ORPHAN_GRACE_S (which any
    # other zombie of the session still gets: someone here may be about to wait for it).
    REAPER.start()
    pid = os.posix_spawn("/bin/sh", ["sh", "-c", "exit 0"], os.environ)
    fd = os.pidfd_open(pid)
    select.select([fd], [], [])
    os.close(fd)
    REAPER.sweep()
    assert pid in zombie_children()  # in its grace
    with REAPER.releasing([pid]):
        REAPER.sweep()
        assert pid not in zombie_children()
