"""An MCP stdio server in a gVisor container of its own: ``runsc run`` whose stdin/stdout are the JSON-RPC pipes.

    sh (joins the server's cgroups) -> setpriv --pdeathsig KILL -> runsc --network=none [--host-uds=open]
        --ignore-cgroups run
        (OCI bundle: the server as the container's process, not attached to a terminal)
        -> inside gVisor: prlimit (cpu, nproc, fsize, nofile, core) -> the server's command

Without a terminal, ``runsc run`` hands its own stdin, stdout and stderr to the container's
process, so the SDK's ``stdio_client`` speaks to the server through it exactly as it does to a
bwrap sandbox. The server's system calls are served by gVisor's Sentry, never the host kernel.

Invariant: the container has no network (``--network=none``: a loopback of its own, no DNS), a
read-only root holding only ``/usr``, ``/bin``, ``/lib*`` and a few files of ``/etc``, read-only
binds of the server's program directories (``mcpserver.program_dirs``), a private ``/proc``,
``/dev`` and ``/tmp``, the workspace read-write at ``/workspace``, and ``server_env`` as its only
environment. Its process runs as the workspace's owner (the uid the agent's own sandboxed calls
write as, never given a capability: the OCI capability sets are empty), with no new privileges.

A server with a ``network`` allow-list keeps ``--network=none``: as under bwrap, its egress
proxy's socket directory is bound read-only at ``mcpproxy.SANDBOX_DIR`` and the server runs
under the forwarder (listening on the Sentry's own loopback) with the proxy variables set. Only
then is ``runsc`` given ``--host-uds=open``: the Sentry may connect to the host unix sockets in
what is bound in (the proxy's; one a host process left in the workspace, such as the agent's own
bwrap calls, would be reachable too), and may create none. A ``runsc`` without that flag is
refused for such a server (``host_uds_problem``).

Limits: the whole sandbox (``runsc run``, the gofer, the Sentry with everything the server
holds in memory, ``/tmp`` included) sits in a host memory cgroup of ``memory_mb`` +
``gvisor.SANDBOX_OVERHEAD_MB`` made by the worker before ``runsc`` starts; breaching it is an OOM
kill the worker reads from the cgroup's counter (``SANDBOX_MEMORY``). ``runsc`` is told to leave
cgroups alone (``--ignore-cgroups``): the one it sits in is the worker's, so its counters survive
the container and the worker removes it. The pids cgroup is only a backstop (the Sentry's host
threads count there); the server's processes are bounded by RLIMIT_NPROC inside, which gVisor
counts per uid for the whole sandbox. CPU, file size and open files are rlimits inside.

Lifetime: ``setpriv --pdeathsig`` ties ``runsc run`` to the thread that started it (the
connection's event loop, which lives as long as the worker's connection), and ``runsc run``
starts the sandbox attached (it dies with ``runsc run``). ``kill`` SIGKILLs every process of the
container and the cgroup; ``cleanup`` (after the SDK has stopped ``runsc run``) also deletes the
container's state (``runsc delete --force``) and removes the bundle and the cgroup, so nothing is
left behind: no process, no container, no cgroup, no directory.
"""

from __future__ import annotations

import functools
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import ErrorCode, SandboxUnavailable
from .base import WORKSPACE, rlimit_args
from . import cgroup, mcpproxy
from .cgroup import CallCgroup

RUNSC_TIMEOUT_S = 30
# The name of every MCP server's cgroup starts with this and the worker's pid (``cgroup.owned_prefix``).
MCP_CGROUP = "warden-mcp"
# The pids cgroup of a gVisor server counts the Sentry's and the gofer's host threads, not the
# server's processes (RLIMIT_NPROC inside bounds those): only a backstop against a runaway runsc.
HOST_PIDS_BACKSTOP = 1024
# Lets the Sentry connect to a unix socket of the host bound into the container (the egress proxy's), and
# nothing more: not create one (``create``), not open host FIFOs (``--host-fifo`` stays ``none``).
HOST_UDS = "--host-uds=open"
_ETC_FILES = ("/etc/alternatives", "/etc/ld.so.cache", "/etc/localtime", "/etc/mime.types")


@functools.lru_cache(maxsize=4)
def host_uds_problem(runsc: str) -> str | None:
    """Why this ``runsc`` cannot let a container connect to the egress proxy's socket (no ``--host-uds``), or None."""
    try:
        flags = subprocess.run([runsc, "flags"], capture_output=True, env={}, timeout=RUNSC_TIMEOUT_S)
        version = subprocess.run([runsc, "--version"], capture_output=True, env={}, timeout=RUNSC_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot ask {runsc} for its flags: {type(exc).__name__}"
    if re.search(rb"^\s*-host-uds\b", flags.stdout + flags.stderr, re.MULTILINE):
        return None
    name = (version.stdout.decode(errors="replace").splitlines() or [runsc])[0].strip()
    return (f"{name} has no --host-uds flag, so its sandbox cannot connect to the egress proxy's unix socket: "
            "a network allow-list under gVisor needs a runsc that has --host-uds (none|open|create|all)")


def _system_mounts() -> list[dict]:
    mounts = [{"destination": "/proc", "type": "proc", "source": "proc"},
              {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
              {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}]
    for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", *_ETC_FILES):
        if os.path.exists(p):
            mounts.append({"destination": p, "type": "bind", "source": p, "options": ["rbind", "ro", "nosuid", "nodev"]})
    return mounts


def bundle_config(command: list[str], env: dict[str, str], workspace: Path, program_dirs: list[str],
                  rlimits: list[str], uid: int, gid: int, prlimit: str = "/usr/bin/prlimit",
                  egress_dir: str | None = None) -> dict:
    """The OCI runtime spec of the server's container (see the module docstring for what it holds)."""
    # /tmp first: a program directory under /tmp (a checkout there) is mounted on top of it, not hidden.
    mounts = [*_system_mounts(),
              *({"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro", "nosuid", "nodev"]}
                for d in program_dirs),
              {"destination": WORKSPACE, "type": "bind", "source": str(workspace), "options": ["rbind", "rw"]}]
    if egress_dir is not None:
        mounts.append({"destination": mcpproxy.SANDBOX_DIR, "type": "bind", "source": egress_dir,
                       "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]})
    no_caps = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    return {"ociVersion": "1.0.0", "hostname": "sandbox", "root": {"path": "rootfs", "readonly": True},
            "process": {"terminal": False, "user": {"uid": uid, "gid": gid}, "cwd": WORKSPACE,
                        "args": [prlimit, *rlimits, "--", *command], "env": [f"{k}={v}" for k, v in env.items()],
                        "noNewPrivileges": True, "capabilities": no_caps},
            "mounts": mounts,
            "linux": {"namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc")]}}


class GVisorLaunch:
    """One start of a server: its bundle and state directory, its cgroup, and the argv the SDK runs."""

    backend = "gvisor"

    def __init__(self, *, runsc: str, setpriv: str, command: list[str], env: dict[str, str], workspace: Path,
                 program_dirs: list[str], limits, memory_overhead_mb: int, egress_dir: str | None = None) -> None:
        if egress_dir is not None and (why := host_uds_problem(runsc)) is not None:
            raise SandboxUnavailable(why, code=ErrorCode.SANDBOX_UNAVAILABLE)
        if os.geteuid() != 0:
            raise SandboxUnavailable("an MCP server under gVisor needs a memory cgroup, which only a worker running "
                                     "as root can make", code=ErrorCode.SANDBOX_UNAVAILABLE)
        self.cgroup = CallCgroup.create(memory_limit_bytes=(limits.memory_mb + memory_overhead_mb) << 20,
                                        pids_max=HOST_PIDS_BACKSTOP, prefix=cgroup.owned_prefix(MCP_CGROUP))
        if self.cgroup is None:
            raise SandboxUnavailable("no memory cgroup can be made here (cgroup v1 or a v2 tree with memory and pids "
                                     "delegated to root): an MCP server's memory_mb could not be enforced",
                                     code=ErrorCode.SANDBOX_UNAVAILABLE)
        self.runsc = runsc
        self.oom = False  # set when the server has ended: its cgroup counted an OOM kill
        self.id = f"warden-mcp-{secrets.token_hex(8)}"
        self.dir = Path(tempfile.mkdtemp(prefix="warden-mcp-gvisor-"))
        self.state = self.dir / "state"
        bundle = self.dir / "bundle"
        (bundle / "rootfs").mkdir(parents=True)
        self.state.mkdir(mode=0o700)
        st = os.stat(workspace)
        rl = rlimit_args(limits, address_space=False)
        (bundle / "config.json").write_text(json.dumps(bundle_config(command, env, workspace, program_dirs, rl,
                                                                     st.st_uid, st.st_gid, egress_dir=egress_dir)))
        self.argv = self.cgroup.join_argv(
            [setpriv, "--pdeathsig", "SIGKILL", "--", runsc, "--root", str(self.state), "--network=none",
             *([HOST_UDS] if egress_dir is not None else []), "--ignore-cgroups", "run", "--bundle", str(bundle),
             self.id])

    def _runsc(self, *args: str) -> None:
        subprocess.run([self.runsc, "--root", str(self.state), *args], capture_output=True, env={},
                       timeout=RUNSC_TIMEOUT_S)

    def oom_killed(self) -> bool:
        return self.cgroup.oom_kills() > 0

    def processes(self) -> list[str]:
        """What runs in the container, as ``runsc ps`` lists it (the server's view from outside)."""
        ps = subprocess.run([self.runsc, "--root", str(self.state), "ps", self.id], capture_output=True, env={},
                            timeout=RUNSC_TIMEOUT_S)
        return ps.stdout.decode(errors="replace").splitlines()[1:] if ps.returncode == 0 else []

    def kill(self) -> None:
        """SIGKILL the container's processes and everything in the cgroup (``runsc run``, gofer, Sentry)."""
        try:
            self._runsc("kill", "--all", self.id, "KILL")
        except (OSError, subprocess.SubprocessError):
            pass  # the cgroup kill below ends the sandbox whatever runsc says
        self.cgroup.kill()

    def cleanup(self) -> None:
        """Once the SDK's ``runsc run`` has ended: no process, container state, cgroup or directory is left."""
        self.kill()
        try:
            self._runsc("delete", "--force", self.id)
        except (OSError, subprocess.SubprocessError):
            pass  # the state directory goes below; a container runsc cannot find has no state left
        self.cgroup.remove()
        shutil.rmtree(self.dir, ignore_errors=True)
