"""Per-agent workspaces, and file access inside one that cannot be talked out of it.

A workspace is a host directory that appears as ``/workspace`` in that agent's sandboxes
and nowhere else. When the worker runs as root it is a tmpfs of ``workspace_mb`` (a hard
size limit: writes past it fail with ENOSPC); otherwise a plain directory whose files are
capped per file by RLIMIT_FSIZE inside the sandbox. The tmpfs is mounted with mount(2)
directly: a new agent's sandbox waits for its workspace, and forking ``mount`` out of a
large worker process costs more than the mount itself.

File access walks a sandbox path one component at a time with ``openat`` and
``O_NOFOLLOW``, so a symlink planted by model-written code (``/workspace/x -> /etc``) is
refused instead of followed, and ``..`` can never climb out. A write makes missing parent
directories one ``mkdirat`` at a time, each then opened the same way, so a link raced in
place of a new directory is refused too.

Nothing here can block on what sandboxed code left in the workspace. Only regular files
are read or written: a FIFO, socket or device node is refused, checked with ``lstat``
before anything is opened and again with ``fstat`` on what was opened. Every open is
``O_NONBLOCK``, so even a node swapped in between cannot hold the call: a FIFO without a
writer opens at once (and is then refused), one without a reader fails with ENXIO, a
device node cannot be opened at all on the ``nodev`` tmpfs, and a file under a lease
answers EWOULDBLOCK instead of waiting for the lease to break. A file is truncated only
after ``fstat`` says it is a regular file. ``list`` opens nothing but directories.
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


MAX_LIST_ENTRIES = 10_000
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
    def _dir_fd(self, parts: list[str], *, create: bool = False) -> Iterator[int]:
        """The directory ``parts`` names, walked without following a link; ``create`` makes missing
        ones (mode 0700, owned like the workspace), each opened the same way once made."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in parts:
                try:
                    if create:
                        self._mkdir_at(fd, part)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    raise _refusal(exc, part) from None
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def _mkdir_at(self, d: int, name: str) -> None:
        """mkdirat: a name that exists (a directory, or a link the caller's no-follow open refuses) is left as it is."""
        try:
            os.mkdir(name, 0o700, dir_fd=d)
        except FileExistsError:
            return
        owner = os.stat(self.root)
        os.chown(name, owner.st_uid, owner.st_gid, dir_fd=d, follow_symlinks=False)

    def kind(self, path: str) -> str | None:
        """What ``path`` is (file, dir, link, fifo, socket, device), from ``lstat``; None if missing."""
        parts = self._parts(path)
        if not parts:
            return "dir"
        *dirs, name = parts
        with self._dir_fd(dirs) as d:
            st = _lstat(d, name, missing_ok=True)
        return None if st is None else _kind(st.st_mode)

    def read(self, path: str, max_bytes: int) -> bytes:
        *dirs, name = self._parts(path) or [""]
        with self._dir_fd(dirs) as d:
            _regular_or_refuse(path, _lstat(d, name or "."))
            with _opened(d, name, os.O_RDONLY) as fd:
                _regular_or_refuse(path, os.fstat(fd))
                data = _read_at_most(fd, max_bytes + 1)
        if len(data) > max_bytes:
            raise ToolFailed(f"{path!r} is larger than {max_bytes} bytes", code=ErrorCode.SANDBOX_OUTPUT)
        return data

    def write(self, path: str, data: bytes) -> int:
        """Create or replace a regular file; missing parent directories are made (never through a link)."""
        *dirs, name = self._parts(path) or [""]
        if not name:
            raise ToolFailed(f"{path!r} names the workspace itself")
        with self._dir_fd(dirs, create=True) as d:
            existing = _lstat(d, name, missing_ok=True)
            if existing is not None:
                _regular_or_refuse(path, existing)
            with _opened(d, name, os.O_WRONLY | os.O_CREAT) as fd:
                _regular_or_refuse(path, os.fstat(fd))
                try:
                    owner = os.stat(self.root)  # files belong to the sandbox's uid, not to the worker's
                    os.fchown(fd, owner.st_uid, owner.st_gid)
                    os.ftruncate(fd, 0)  # only now: O_TRUNC would act before the type is known
                    return _write_all(fd, data)
                except OSError as exc:
                    raise _refusal(exc, name) from None

    def list(self, path: str, max_entries: int = MAX_LIST_ENTRIES) -> list[dict[str, object]]:
        """Entries with their type (file, dir, link, fifo, socket, device): ``lstat`` only, nothing is opened."""
        with self._dir_fd(self._parts(path)) as d:
            names = []
            with os.scandir(d) as entries:  # stops at the cap: a directory of a million files costs no more
                for entry in entries:
                    if len(names) == max_entries:
                        raise ToolFailed(f"{path!r} has more than {max_entries} entries",
                                         code=ErrorCode.SANDBOX_OUTPUT)
                    names.append(entry.name)
            out = []
            for name in sorted(names):
                st = _lstat(d, name, missing_ok=True)
                if st is not None:  # removed by the sandbox between scandir and lstat
                    out.append({"name": name, "type": _kind(st.st_mode), "bytes": st.st_size})
            return out


# Every open is non-blocking and never makes a terminal the worker's controlling tty.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _OPEN_FLAGS
_KINDS = ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "link"), (stat.S_ISFIFO, "fifo"),
          (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "device"), (stat.S_ISBLK, "device"))


def _kind(mode: int) -> str:
    return next((kind for test, kind in _KINDS if test(mode)), "other")


def _lstat(d: int, name: str, *, missing_ok: bool = False) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=d, follow_symlinks=False)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ToolFailed(f"{name!r}: No such file or directory") from None
    except OSError as exc:
        raise _refusal(exc, name) from None


def _regular_or_refuse(path: str, st: os.stat_result | None) -> None:
    if st is None or not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode) if st is not None else "missing"
        raise ToolFailed(f"{path!r} is a {kind}, not a regular file: refused (file tools follow no links and "
                         "read or write only regular files)")


@contextmanager
def _opened(d: int, name: str, flags: int) -> Iterator[int]:
    try:
        fd = os.open(name, flags | _OPEN_FLAGS, 0o600, dir_fd=d)
    except OSError as exc:
        raise _refusal(exc, name) from None
    try:
        yield fd
    finally:
        os.close(fd)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, size = [], 0
    while size < limit:
        chunk = os.read(fd, limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> int:
    view, done = memoryview(data), 0
    while done < len(data):
        done += os.write(fd, view[done:])
    return done


def _refusal(exc: OSError, part: str) -> ToolFailed:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return ToolFailed(f"{part!r} is a symlink or not a directory: refused (no links are followed)")
    if exc.errno in (errno.ENXIO, errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
        return ToolFailed(f"{part!r} cannot be opened without blocking, or is not open to the worker: refused")
    if exc.errno == errno.ENOSPC or exc.errno == errno.EFBIG:
        return ToolFailed(f"workspace full writing {part!r}", code=ErrorCode.SANDBOX_OUTPUT)
    return ToolFailed(f"{part!r}: {exc.strerror}")
