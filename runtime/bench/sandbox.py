"""Suite ``sandbox``: cold start and warm call latency of the gVisor and bubblewrap backends.

Every figure is in milliseconds, taken through ``SandboxPool`` exactly as a tool worker
uses it, with the limits ``LIMITS``, for two kinds of first command: ``trivial`` (``true``)
and ``python_exec`` (``python3 -I -`` running ``print(1)``, the built-in ``python.exec``).

* ``<backend>.cold_start.<kind>``: from asking for a new agent's sandbox
  (``SandboxPool.handle`` for an agent the pool has never seen) to the first command's
  result, with the warm pool off. It includes the workspace (a tmpfs), the session, the
  sandbox start (gVisor: ``runsc run``) and the first process. The issue's cold-start
  targets apply to these figures.
* ``<backend>.session_start.<kind>``: the same interval with the warm pool on and a spare
  ready: the new agent claims a pre-started sandbox (with its own fresh workspace) instead
  of starting one. Reported beside the cold start, never instead of it.
* ``<backend>.warm.python_exec`` / ``.warm.trivial``: a call by an agent whose session
  exists, made a moment after its previous call (as between two model turns), so the
  interpreter the previous ``python.exec`` started ahead of time is ready. ``true`` has no
  process kept warm for it: it is a new process in the existing sandbox.

Each run uses fresh pools; a figure's p50 is the median over runs of each run's p50.
``profile`` splits the cold starts measured into their parts (workspace and session, sandbox
start, first process), then times the pieces of a first process one by one on fresh sessions.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

from ..sandbox.base import Limits
from ..sandbox.pool import SandboxHandle, SandboxPool, make_backend
from ..sandbox.workspace import Workspace
from .stats import Figure, summarise

SUITE = "sandbox"
BACKENDS = ("bwrap", "gvisor")
KINDS = ("trivial", "python_exec")
LIMITS = Limits(cpu_s=5, wall_s=10, memory_mb=256, workspace_mb=64)
PY = ["python3", "-I", "-"]
PY_NO_SITE = ["python3", "-I", "-S", "-"]
TRIVIAL = ["true"]
TARGET_WARM_PYTHON_MS = 20.0
TARGET_COLD_START_MS = {"gvisor": 250.0, "bwrap": 20.0}
# Pause before a call so that what the previous call started in the background (the next
# interpreter; gVisor's check for processes left behind) has finished, as between model turns.
SETTLE_S = {"bwrap": 0.1, "gvisor": 0.3}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def _call(handle: SandboxHandle, kind: str) -> None:
    argv, stdin, expect = (PY, b"print(1)", b"1\n") if kind == "python_exec" else (TRIVIAL, b"", b"")
    result = handle.run(argv, stdin=stdin)
    if result.exit_code != 0 or result.stdout != expect:
        raise RuntimeError(f"{handle.backend} {kind} failed: exit {result.exit_code}, "
                           f"stderr {result.stderr[-300:]!r}")


class _Closer:
    """Closes pools and sessions: at once, or (``background``) beside the next measurement.

    Deleting a gVisor sandbox waits over a second for the host to reap its Sentry while using
    almost no CPU; the quick run lets that wait overlap the next measurement to fit its budget.
    """

    def __init__(self, background: bool) -> None:
        self.background = background
        self._threads: list[threading.Thread] = []

    def __call__(self, close: Callable[[], None]) -> None:
        if not self.background:
            close()
            return
        thread = threading.Thread(target=close, daemon=True)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        for thread in self._threads:
            thread.join()
        self._threads.clear()


@contextmanager
def _timed_method(cls: type, name: str, sink: list[float]) -> Iterator[None]:
    """Time every call of ``cls.name`` into ``sink`` (ms) while the block runs."""
    original = getattr(cls, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink.append(_ms(t0))

    setattr(cls, name, timed)
    try:
        yield
    finally:
        setattr(cls, name, original)


def _cold_run(backend: str, n: int, closer: _Closer) -> dict[str, list[float]]:
    """``n`` new agents per kind, warm pool off; each sample also split into its parts:
    ``handle`` (workspace and session), ``sandbox_start`` (gVisor: ``runsc run``, through the
    bindings) and ``first_process`` (the rest: starting the command and getting its result)."""
    samples: dict[str, list[float]] = {f"{k}{part}": [] for k in KINDS
                                       for part in ("", ".handle", ".sandbox_start", ".first_process")}
    pool = SandboxPool(spares=0)
    try:
        _call(pool.handle("warm-up", backend, LIMITS), "python_exec")  # backend check, page cache: not timed
        time.sleep(SETTLE_S[backend])
        for i in range(n):
            for kind in KINDS:
                starts: list[float] = []
                with _sandbox_starts(backend, starts):
                    t0 = time.perf_counter()
                    handle = pool.handle(f"cold-{kind}-{i}", backend, LIMITS)
                    t1 = time.perf_counter()
                    _call(handle, kind)
                    total = _ms(t0)
                start = sum(starts)
                samples[kind].append(total)
                samples[f"{kind}.handle"].append((t1 - t0) * 1e3)
                samples[f"{kind}.sandbox_start"].append(start)
                samples[f"{kind}.first_process"].append(total - (t1 - t0) * 1e3 - start)
                time.sleep(SETTLE_S[backend])
    finally:
        closer(pool.close)
    return samples


def _sandbox_starts(backend: str, sink: list[float]) -> Any:
    if backend != "gvisor":
        return nullcontext()
    from ..sandbox.gvisor import _Sandbox

    return _timed_method(_Sandbox, "__init__", sink)


def _pool_run(backend: str, n: int, n_warm: int, closer: _Closer) -> dict[str, list[float]]:
    """``n`` new agents per kind claiming a ready spare; then warm calls of the last of them."""
    samples: dict[str, list[float]] = {k: [] for k in (*KINDS, "spare_ready", "warm.python_exec", "warm.trivial")}
    pool = SandboxPool(spares=1)
    try:
        pool.prepare(backend, LIMITS)
        handle = None
        for i in range(n):
            for kind in KINDS:
                t_ready = time.perf_counter()
                if not pool.wait_ready(60) or pool.spare_count(backend, LIMITS) == 0:
                    raise RuntimeError(f"no spare {backend} sandbox was made: {pool.spare_failures}")
                if handle is not None:  # from the end of the previous claim's first call
                    samples["spare_ready"].append(_ms(t_ready))
                time.sleep(SETTLE_S[backend])  # the spare's interpreters finish starting
                claimed = pool.claimed
                t0 = time.perf_counter()
                handle = pool.handle(f"pooled-{kind}-{i}", backend, LIMITS)
                _call(handle, kind)
                samples[kind].append(_ms(t0))
                if pool.claimed != claimed + 1:
                    raise RuntimeError("the new agent did not get a spare sandbox")
        pool.wait_ready(60)
        assert handle is not None
        for kind in KINDS:
            for _ in range(n_warm):
                time.sleep(SETTLE_S[backend])
                t0 = time.perf_counter()
                _call(handle, kind)
                samples[f"warm.{kind}"].append(_ms(t0))
    finally:
        closer(pool.close)
    return samples


# --------------------------------------------------------------------------------- profile
def _host(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env={"PATH": "/usr/bin:/bin"}, check=True)
    return _ms(t0)


def _run_ms(session: Any, argv: list[str], stdin: bytes = b"") -> float:
    t0 = time.perf_counter()
    result = session.run(argv, stdin=stdin, limits=LIMITS)
    elapsed = _ms(t0)
    if result.exit_code != 0:
        raise RuntimeError(f"{session.backend} {argv}: exit {result.exit_code}: {result.stderr[-300:]!r}")
    return elapsed


def _spawn_ms(*, uid_in_child: bool) -> float:
    """Starting ``true`` as another uid from this process, the two ways (to the exit)."""
    uid = 299_999
    argv, ids = (["true"], {"user": uid, "group": uid, "extra_groups": []}) if uid_in_child else (
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "true"], {})
    t0 = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env={"PATH": "/usr/bin:/bin"}, check=True,
                   process_group=0, **ids)
    return _ms(t0)


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _mount_binary_ms(root: Path) -> float | None:
    """A workspace tmpfs mounted by forking ``mount`` instead of calling mount(2), for comparison."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    target = root / "by-mount-binary"
    target.mkdir()
    t0 = time.perf_counter()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={LIMITS.workspace_mb}m,mode=0700,nosuid,nodev",
                           "tmpfs", str(target)], capture_output=True)
    elapsed = _ms(t0)
    if done.returncode == 0:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)
    target.rmdir()
    return elapsed if done.returncode == 0 else None


def _stages(backend_name: str, n: int, closer: _Closer) -> dict[str, list[float]]:
    """Each stage of a cold start, timed on its own on ``n`` fresh sessions."""
    backend = make_backend(backend_name)
    backend.check()
    stages: dict[str, list[float]] = {}
    settle = SETTLE_S[backend_name]

    def add(name: str, value: float | None) -> None:
        if value is not None:
            stages.setdefault(name, []).append(value)

    root = Path(tempfile.mkdtemp(prefix="warden-bench-ws-"))
    os.chmod(root, 0o711)
    sessions, workspaces = [], []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            ws = Workspace(root / f"ws{i}", size_mb=LIMITS.workspace_mb)
            add("workspace (tmpfs by mount(2))" if ws.mounted else "workspace (directory)", _ms(t0))
            workspaces.append(ws)
            add("workspace by the mount binary (fork + exec)", _mount_binary_ms(root))
            t0 = time.perf_counter()
            session = backend.open(ws.root, workspace_mb=LIMITS.workspace_mb, key=f"profile-{i}")
            add("session open", _ms(t0))
            sessions.append(session)
            add("first true", _run_ms(session, TRIVIAL))
            time.sleep(settle)
            add("true again", _run_ms(session, TRIVIAL))
            time.sleep(settle)
            # One interpreter per session: a second one finds the caches the first one filled.
            if i % 2 == 0:
                add("first python3 -I", _run_ms(session, PY, b"print(1)"))
            else:
                add("first python3 -I -S (no site)", _run_ms(session, PY_NO_SITE, b"print(1)"))
            time.sleep(settle)
            add("host: true", _host(["true"]))
            add("host: prlimit true", _host(["prlimit", "--cpu=5:6", "--nofile=256", "--", "true"]))
            add("host: python3 -I", _host(["python3", "-I", "-c", "print(1)"]))
            add("host: python3 -I -S", _host(["python3", "-I", "-S", "-c", "print(1)"]))
            if os.geteuid() == 0:
                add("spawn: fork + setuid in the worker", _spawn_ms(uid_in_child=True))
                add("spawn: vfork + setpriv exec", _spawn_ms(uid_in_child=False))
            if backend_name == "gvisor":
                add("host: runsc client start (runsc --version)", _host(["runsc", "--version"]))
    finally:
        def close() -> None:
            for s in sessions:
                s.close()
            for ws in workspaces:
                ws.remove()
            shutil.rmtree(root, ignore_errors=True)

        closer(close)
    return stages


def _profile(stages: dict[str, dict[str, list[float]]], parts: dict[str, dict[str, float]],
             figures: dict[str, Figure]) -> str:
    lines = ["Cold start = SandboxPool.handle() for a new agent, warm pool off -> the first command's result.", "",
             "1. The cold starts measured, split into their parts (p50 ms over all samples of the figure):",
             "   handle = workspace (tmpfs) + session; sandbox start = runsc run through the gvisor bindings",
             "   (gVisor only); first process = starting the command in the sandbox and reading its result.", ""]
    for name, split in parts.items():
        f = figures.get(name)
        verdict = "" if f is None else f"p50 {f.p50:.2f}, target {f.target}: {'met' if f.met else 'MISSED'}"
        lines.append(f"   {name:32} handle {split['handle']:6.2f}  sandbox start {split['sandbox_start']:7.2f}  "
                     f"first process {split['first_process']:7.2f}   ({verdict})")
    lines += ["", "   With the warm pool (not a cold start: a pre-started sandbox is claimed):"]
    lines += [f"   {f.name:32} p50 {f.p50:.2f}" for f in figures.values() if ".session_start." in f.name]
    lines += ["", "2. The pieces of a first process, each timed on its own on fresh sessions: p50 ms [samples].",
              "   'first' = the first process of its kind in a new session; the two first-python rows come from",
              f"   different sessions. This process holds {_rss_mib():.0f} MiB (a fork's cost grows with it; a "
              "vfork's does not).", ""]
    for backend, samples in stages.items():
        m = {k: statistics.median(v) for k, v in samples.items()}
        lines.append(f"== {backend} ==")
        lines += [f"  {name:46} {value:8.2f}  [{len(samples[name])}]" for name, value in m.items()]
        py, py_s = m.get("first python3 -I"), m.get("first python3 -I -S (no site)")
        first_true, again = m["first true"], m["true again"]
        derived: list[tuple[str, float | None]]
        if backend == "bwrap":
            derived = [
                ("prlimit exec (host: prlimit true - host: true)", m["host: prlimit true"] - m["host: true"]),
                ("setpriv + prlimit + bwrap setup + true (first true)", first_true),
                ("python start in bwrap (first python3 -I - first true)", None if py is None else py - first_true),
                ("  of which site (first -I - first -I -S)", None if py is None or py_s is None else py - py_s),
            ]
        else:
            derived = [
                ("sandbox start, runsc run (first true - true again)", first_true - again),
                ("runsc exec + prlimit + true, running sandbox", again),
                ("  of which the runsc client's start", m.get("host: runsc client start (runsc --version)")),
                ("python start in gVisor (first python3 -I - true again)", None if py is None else py - again),
                ("  of which site (first -I - first -I -S)", None if py is None or py_s is None else py - py_s),
            ]
        lines.append("  derived:")
        lines += [f"    {name:54} {value:8.2f}" for name, value in derived if value is not None]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- run
def run(quick: bool = False, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite on both backends; ``quick`` takes about 15 s, the full run a few minutes.

    A backend that cannot run here raises its ``SandboxUnavailable``: it is never skipped.
    """
    runs, n_cold, n_pool, n_warm, n_stages = (1, 2, 2, 3, 2) if quick else (5, 5, 5, 20, 6)
    for backend in BACKENDS:
        make_backend(backend).check()
    closer = _Closer(background=quick)
    load_before = os.getloadavg()
    figures: list[Figure] = []
    by_name: dict[str, Figure] = {}
    stages: dict[str, dict[str, list[float]]] = {}
    parts: dict[str, dict[str, dict[str, float]]] = {}
    for backend in BACKENDS:
        cold: dict[str, list[list[float]]] = {}
        pooled: dict[str, list[list[float]]] = {}
        for r in range(runs):
            progress(f"sandbox: {backend}: run {r + 1}/{runs}: cold starts")
            for kind, xs in _cold_run(backend, n_cold, closer).items():
                cold.setdefault(kind, []).append(xs)
            progress(f"sandbox: {backend}: run {r + 1}/{runs}: warm pool and warm calls")
            for kind, xs in _pool_run(backend, n_pool, n_warm, closer).items():
                pooled.setdefault(kind, []).append(xs)
        spare_ready = [x for xs in pooled["spare_ready"] for x in xs]
        for kind in KINDS:
            parts[f"{backend}.cold_start.{kind}"] = split = {
                part: round(statistics.median(x for xs in cold[f"{kind}.{part}"] for x in xs), 2)
                for part in ("handle", "sandbox_start", "first_process")}
            figures.append(summarise(
                SUITE, f"{backend}.cold_start.{kind}", "ms", cold[kind], target_max_p50=TARGET_COLD_START_MS[backend],
                backend=backend, warm_pool=False, command=" ".join(PY if kind == "python_exec" else TRIVIAL),
                parts_ms_p50=split))
        for kind in KINDS:
            fig = summarise(SUITE, f"{backend}.session_start.{kind}", "ms", pooled[kind], backend=backend,
                            warm_pool=True, command=" ".join(PY if kind == "python_exec" else TRIVIAL),
                            spare_ready_ms_p50=round(statistics.median(spare_ready), 1) if spare_ready else None)
            fig.extra["within_cold_start_target"] = fig.p50 <= TARGET_COLD_START_MS[backend]
            figures.append(fig)
        figures.append(summarise(SUITE, f"{backend}.warm.python_exec", "ms", pooled["warm.python_exec"],
                                 target_max_p50=TARGET_WARM_PYTHON_MS, backend=backend, command=" ".join(PY)))
        figures.append(summarise(SUITE, f"{backend}.warm.trivial", "ms", pooled["warm.trivial"], backend=backend,
                                 command=" ".join(TRIVIAL)))
        for f in figures[-6:]:
            by_name[f.name] = f
            progress(f"sandbox: {f.name}: p50 {f.p50} ms, p99 {f.p99} ms"
                     + (f" (target {f.target}: {'met' if f.met else 'MISSED'})" if f.target else ""))
        progress(f"sandbox: {backend}: profiling the stages of a cold start")
        stages[backend] = _stages(backend, n_stages, closer)
    load_after = os.getloadavg()
    closer.join()
    notes = [
        "cold_start.<kind>: from SandboxPool.handle() for an agent the pool has never seen (warm pool off) to the "
        "first command's result: workspace tmpfs, session, sandbox start (gVisor: runsc run), first process. "
        "The cold-start targets (gVisor <= 250 ms, bubblewrap <= 20 ms) apply to these figures.",
        "session_start.<kind>: the same interval with the warm pool on and a spare ready, so the new agent claims a "
        "pre-started sandbox with its own fresh workspace. No target is attached; extra.within_cold_start_target "
        "says whether it would meet the cold-start one. extra.spare_ready_ms_p50 is how long the pool took to "
        "have the next spare ready after a claim (from the end of the claiming agent's first call).",
        "warm.<kind>: an existing agent's call, made after a pause of "
        f"{SETTLE_S['bwrap'] * 1e3:.0f} ms (bubblewrap) / {SETTLE_S['gvisor'] * 1e3:.0f} ms (gVisor), as between "
        "model turns, so the interpreter started after the previous python.exec is ready; 'true' has no warm "
        "process and is a new process in the existing sandbox.",
        "trivial = 'true'; python_exec = 'python3 -I -' running 'print(1)' (what the built-in python.exec runs). "
        f"Limits: {LIMITS}.",
        f"{runs} runs per figure, each with fresh pools; per run {n_cold} cold starts and {n_pool} warm-pool session "
        f"starts per kind, {n_warm} warm calls per kind; p50/p99 are medians over runs, spread is the min..max run "
        "p50. A warm-up agent per cold run (backend check, page cache) is not timed.",
        f"Load average (1/5/15 min) before the suite {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
        f"after {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} CPUs: other "
        "processes' load shows in these figures.",
    ]
    for fig in figures:
        if fig.met is False:
            notes.append(f"MISSED: {fig.name} p50 {fig.p50} ms, target {fig.target}; see profile.")
    return {"suite": SUITE, "figures": [f.to_dict() for f in figures], "profile": _profile(stages, parts, by_name),
            "notes": notes}


if __name__ == "__main__":  # pragma: no cover
    import json
    import sys

    result = run(quick="--quick" in sys.argv)
    print(result["profile"])
    print(json.dumps({k: v for k, v in result.items() if k != "profile"}, indent=1))
