"""Per-agent workspaces, and file access inside one that cannot be talked out of it.

A workspace is a host directory that appears as ``/workspace`` in that agent's sandboxes
and nowhere else. When the worker runs as root it is a tmpfs of ``workspace_mb`` (a hard
size limit: writes past it fail with ENOSPC); otherwise a plain directory whose files are
capped per file by RLIMIT_FSIZE inside the sandbox. The tmpfs is mounted with mount(2)
directly: a new agent's sandbox waits for its workspace, and forking ``mount`` out of a
large worker process costs more than the mount itself.

``resolve`` walks a sandbox path one component at a time with ``openat`` and
``O_NOFOLLOW``, so a symlink planted by model-written code (``/workspace/x -> /etc``) is
refused instead of followed, and ``..`` can never climb out.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import shutil
import stat
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from ..errors import ErrorCode, ToolFailed
from .base import WORKSPACE


_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MNT_DETACH = 0x2  # like ``umount -l``: a process still inside cannot keep the mount busy


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _mount_tmpfs(root: Path, size_mb: int) -> bool:
    """A private tmpfs of ``size_mb`` on ``root``; False if this process may not mount.

    It holds at most one inode per 4 KiB page of its size: inodes cost kernel memory that
    ``size`` does not count, and 50,000 empty files would otherwise fit in 16 MiB."""
    options = f"size={size_mb}m,nr_inodes={max(size_mb, 1) * 256},mode=0700".encode()
    return _libc().mount(b"tmpfs", os.fsencode(root), b"tmpfs", _MS_NOSUID | _MS_NODEV, options) == 0


class Workspace:
    def __init__(self, root: Path, *, size_mb: int) -> None:
        self.root = root
        self.size_mb = size_mb
        self.mounted = False
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        if os.geteuid() == 0:
            self.mounted = _mount_tmpfs(root, size_mb)

    @property
    def size_limit(self) -> str:
        return f"tmpfs {self.size_mb} MiB" if self.mounted else f"{self.size_mb} MiB per file (RLIMIT_FSIZE)"

    def remove(self) -> None:
        if self.mounted:
            _libc().umount2(os.fsencode(self.root), _MNT_DETACH)
            self.mounted = False
        shutil.rmtree(self.root, ignore_errors=True)

    # ----------------------------------------------------------------- safe file access
    def _parts(self, path: str) -> list[str]:
        norm = posixpath.normpath("/" + path.lstrip("/"))
        if norm != WORKSPACE and not norm.startswith(WORKSPACE + "/"):
            raise ToolFailed(f"{path!r} is outside {WORKSPACE}", code=ErrorCode.TOOL_FAILED)
        return [p for p in norm[len(WORKSPACE):].split("/") if p]

    @contextmanager
    def _dir_fd(self, parts: list[str]) -> Iterator[int]:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    raise _refusal(exc, part) from None
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def read(self, path: str, max_bytes: int) -> bytes:
        *dirs, name = self._parts(path) or [""]
        with self._dir_fd(dirs) as d:
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=d)
            except OSError as exc:
                raise _refusal(exc, name) from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise ToolFailed(f"{path!r} is not a regular file")
                data = os.read(fd, max_bytes + 1)
            finally:
                os.close(fd)
        if len(data) > max_bytes:
            raise ToolFailed(f"{path!r} is larger than {max_bytes} bytes", code=ErrorCode.SANDBOX_OUTPUT)
        return data

    def write(self, path: str, data: bytes) -> int:
        *dirs, name = self._parts(path) or [""]
        if not name:
            raise ToolFailed(f"{path!r} names the workspace itself")
        with self._dir_fd(dirs) as d:
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=d)
            except OSError as exc:
                raise _refusal(exc, name) from None
            try:
                owner = os.stat(self.root)  # files belong to the sandbox's uid, not to the worker's
                os.fchown(fd, owner.st_uid, owner.st_gid)
                return os.write(fd, data)
            except OSError as exc:
                raise _refusal(exc, name) from None
            finally:
                os.close(fd)

    def list(self, path: str) -> list[dict[str, object]]:
        with self._dir_fd(self._parts(path)) as d:
            out = []
            for name in sorted(os.listdir(d)):
                st = os.stat(name, dir_fd=d, follow_symlinks=False)
                kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
                out.append({"name": name, "type": kind, "bytes": st.st_size})
            return out


def _refusal(exc: OSError, part: str) -> ToolFailed:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return ToolFailed(f"{part!r} is a symlink or not a directory: refused (no links are followed)")
    if exc.errno == errno.ENOSPC or exc.errno == errno.EFBIG:
        return ToolFailed(f"workspace full writing {part!r}", code=ErrorCode.SANDBOX_OUTPUT)
    return ToolFailed(f"{part!r}: {exc.strerror}")
