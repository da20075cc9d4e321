"""Artifacts: the workspace files a job keeps, read at job end on the worker that holds them.

The paths are the job file's (``artifacts.paths``), never an agent's choice. Every file is
read with ``Workspace``'s own access, the one the file tools use: paths are walked with
``O_NOFOLLOW`` (a link is skipped, never followed, wherever it sits), only regular files are
read (a FIFO, socket or device is skipped without blocking), and a directory is taken
recursively. What does not fit the caps is skipped and named, never cut: ``max_bytes`` for
all of one agent's files together, ``max_files`` files.
"""

from __future__ import annotations

import posixpath
from typing import Any

from ..errors import ToolFailed
from .workspace import Workspace

MAX_SKIPPED_NOTES = 100


def collect(ws: Workspace, paths: list[str], *, max_bytes: int, max_files: int) -> dict[str, Any]:
    """``{"files": [{"path", "data"}], "skipped": [{"path", "reason"}], "bytes": n}`` for one workspace."""
    files: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    total = 0
    queue = list(paths)
    while queue:
        path = queue.pop(0)
        try:
            kind = ws.kind(path)
            if kind == "dir":
                queue[0:0] = [posixpath.join(path, e["name"]) for e in ws.list(path)]
                continue
            if kind != "file":
                raise ToolFailed("missing" if kind is None else f"a {kind}, not a regular file: skipped")
            if len(files) == max_files:
                raise ToolFailed(f"over max_files ({max_files})")
            data = ws.read(path, max_bytes - total)  # a file over what is left is refused whole
            files.append({"path": path, "data": data})
            total += len(data)
        except ToolFailed as exc:
            if len(skipped) < MAX_SKIPPED_NOTES:
                skipped.append({"path": path, "reason": exc.reason})
    return {"files": files, "skipped": skipped, "bytes": total}
