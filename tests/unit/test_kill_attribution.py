"""``attribute``: a limit is named only from what the worker observed, never from the exit status alone."""

from __future__ import annotations

import pytest

from runtime.sandbox.base import Limits, Observed, attribute

LIMITS = Limits(cpu_s=2, memory_mb=128, max_pids=8)


@pytest.mark.parametrize("code", [1, 137, 152, -9, -24, 0])
def test_an_exit_status_alone_names_no_limit(code):
    assert attribute(code, Observed(), LIMITS) == (None, "")
    assert attribute(code, Observed(cpu_s=0.01), LIMITS) == (None, "")
    assert attribute(code, Observed(cpu_s=0.01, cpu_watched=True), LIMITS) == (None, "")


def test_an_rlimit_kill_needs_the_cpu_time_to_go_with_it():
    assert attribute(137, Observed(cpu_s=1.95), LIMITS)[0] == "cpu"
    assert attribute(-24, Observed(cpu_s=2.3), LIMITS)[0] == "cpu"
    assert attribute(137, Observed(cpu_s=1.2), LIMITS) == (None, "")  # too little CPU: the program exited 137
    assert attribute(1, Observed(cpu_s=5.0), LIMITS) == (None, "")    # not how the kernel ends a process


def test_watched_cpu_time_is_a_breach_whatever_the_exit():
    assert attribute(0, Observed(cpu_s=2.01, cpu_watched=True), LIMITS)[0] == "cpu"
    assert attribute(137, Observed(cpu_s=1.99, cpu_watched=True), LIMITS) == (None, "")


def test_cgroup_findings_come_first():
    seen = Observed(cpu_s=9.0, cpu_watched=True, memory="memory > 128 MiB", pids="processes > 8")
    assert attribute(0, seen, LIMITS) == ("memory", "memory > 128 MiB")
    assert attribute(0, Observed(pids="processes > 8"), LIMITS) == ("pids", "processes > 8")
