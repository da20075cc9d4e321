"""The driver's side of artifacts: ask every tool worker for the job's chosen workspace files
at job end, and write them under ``<run dir>/artifacts/<agent>/<path in the workspace>``.

A worker is on the untrusted side, so its answer is checked again here: only agents of this
job, only paths under ``/workspace`` without ``..``, at most the caps, and a file is created
only where none exists (``O_EXCL``, no link followed) inside the run directory.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
from pathlib import Path
from typing import Any

from .sandbox.base import WORKSPACE
from .sandbox.worker import artifacts_proof

MAX_PATH_CHARS = 1024  # a path the sandbox made may be deeper than the driver should follow
MAX_PATH_PARTS = 32


async def collect_artifacts(workers: list[Any], *, paths: list[str], max_bytes: int, max_files: int,
                            dispatch_key: bytes, job_id: str, agents: list[str], run_dir: Path,
                            timeout_s: float) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Per agent ``{"files", "bytes", "skipped"}``, and what could not be collected (a dead worker)."""
    proof = artifacts_proof(dispatch_key, job_id)
    replies = await asyncio.gather(*[asyncio.wait_for(w.artifacts.remote(proof, paths, max_bytes, max_files),
                                                      timeout_s) for w in workers], return_exceptions=True)
    report: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for i, reply in enumerate(replies):
        if isinstance(reply, BaseException):
            problems.append(f"tool worker {i} did not answer ({type(reply).__name__}): the workspaces it held "
                            "are lost, with any artifacts in them")
            continue
        for agent, got in (reply or {}).items():
            if agent in agents and isinstance(got, dict):
                report[agent] = save(run_dir / "artifacts" / agent, got, max_bytes=max_bytes, max_files=max_files)
    return report, problems


def save(dest: Path, got: dict[str, Any], *, max_bytes: int, max_files: int) -> dict[str, Any]:
    """Write one agent's files under ``dest``; whatever breaks a rule is skipped and named."""
    skipped = [s for s in got.get("skipped", []) if isinstance(s, dict)][:100]
    files, total = 0, 0
    for item in got.get("files", []) if isinstance(got.get("files"), list) else []:
        path, data = (item.get("path"), item.get("data")) if isinstance(item, dict) else (None, None)
        rel = _relative(path)
        if rel is None or not isinstance(data, bytes):
            skipped.append({"path": str(path)[:200], "reason": f"not a workspace path of at most {MAX_PATH_PARTS} "
                                                              f"parts and {MAX_PATH_CHARS} characters: refused"})
        elif files == max_files or total + len(data) > max_bytes:
            skipped.append({"path": path, "reason": "over the artifacts caps"})
        elif _write_new(dest, rel, data):
            files, total = files + 1, total + len(data)
        else:
            skipped.append({"path": path, "reason": "cannot be written under the run directory"})
    return {"dir": str(dest), "files": files, "bytes": total, "skipped": skipped}


def _relative(path: Any) -> list[str] | None:
    """The parts of ``path`` below /workspace, or None if it is not plainly there."""
    if not isinstance(path, str) or "\0" in path or not path.startswith(WORKSPACE + "/") or len(path) > MAX_PATH_CHARS:
        return None
    parts = path[len(WORKSPACE) + 1:].split("/")
    if posixpath.normpath(path) != path or len(parts) > MAX_PATH_PARTS or any(p in ("", ".", "..") for p in parts):
        return None
    return parts


def _write_new(dest: Path, parts: list[str], data: bytes) -> bool:
    target = dest.joinpath(*parts)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.parent.resolve() != dest.resolve().joinpath(*parts[:-1]):  # a link in between
            return False
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True
