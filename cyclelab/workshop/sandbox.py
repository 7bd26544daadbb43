"""Least privilege for learner code: its own process group, resource limits, an unprivileged user, nothing left behind.

:func:`run_limited` starts a command the grader does not trust: in a new session (process group), with
``setrlimit`` limits on address space, CPU seconds and processes, and, when the grader runs as root, as the
user ``nobody`` (when that user can run cyclelab; else a warning says it runs as root). Whatever happens,
the group is killed afterwards. The command itself calls :func:`contain` first: it becomes a child subreaper,
so the kernels and processes it starts cannot escape into another session unseen, and it kills them all when
it ends. What this cannot prevent is written in docs/workshop.md ("What grading cannot prevent").
"""

from __future__ import annotations

import atexit
import ctypes
import os
import pwd
import resource
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
NOBODY = 65534  # the real uid root's learner processes are counted under
SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(os.uname().machine, -1)


@dataclass(frozen=True)
class Limits:
    """Resource limits for one learner process (and everything it starts)."""

    memory_bytes: int = 16 << 30  # address space; torch reserves more than it touches
    cpu_seconds: int = 1800
    processes: int = 512  # beyond what the user already runs


@dataclass
class Outcome:
    """How a limited command ended."""

    returncode: int | None  # None when it ran out of time
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def _user_processes(uid: int) -> int:
    """How many processes ``uid`` runs now (RLIMIT_NPROC counts them all)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                count += os.stat(f"/proc/{entry}").st_uid == uid
            except OSError:
                pass
    return count


def _preexec(limits: Limits, user: pwd.struct_passwd | None):
    """The function run in the child before exec: limits first, then the user (root may still set them).
    Root without an unprivileged user keeps uid 0 for its files, but counts its processes under ``nobody``'s
    real uid and gives up its capabilities: Linux exempts real uid 0 (and capable processes) from the limit."""
    root = user is None and os.getuid() == 0  # (a process already counted under nobody stays so)
    uid = user.pw_uid if user else (NOBODY if root else os.getuid())
    nproc = _user_processes(uid) + limits.processes

    def apply() -> None:
        _lower(resource.RLIMIT_AS, limits.memory_bytes, limits.memory_bytes)
        _lower(resource.RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 10)
        _lower(resource.RLIMIT_NPROC, nproc, nproc)
        if user:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        elif root:
            os.setresuid(uid, 0, 0)
            drop_capabilities()

    return apply


def _lower(kind: int, soft: int, hard: int) -> None:
    """Set a limit, never above the hard limit this process already has (only a capable one may raise it)."""
    _, now = resource.getrlimit(kind)
    if now != resource.RLIM_INFINITY:
        soft, hard = min(soft, now), min(hard, now)
    resource.setrlimit(kind, (soft, hard))


def drop_capabilities() -> None:
    """Give up every capability of this process and of what it runs (Linux: the bounding set, then ``capset``):
    a root process keeps uid 0 and its files but no longer overrides limits or permissions. Best effort:
    nothing happens where these calls are missing."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: twice (64 capabilities), all zero
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in range(64):  # an exec as root would get the bounding set back
            libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0)
        libc.syscall(SYS_CAPSET, header, data)
    except (OSError, AttributeError):
        pass


@lru_cache(maxsize=1)
def unprivileged_user() -> pwd.struct_passwd | None:
    """``nobody`` when the grader runs as root and ``nobody`` can import cyclelab; else None (with a warning as root)."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        warnings.warn("grading as root: there is no user 'nobody' to run learners' notebooks as", stacklevel=2)
        return None
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import cyclelab.workshop.grade"],
            capture_output=True,
            preexec_fn=_preexec(Limits(), user),
            env=os.environ.copy(),
            cwd="/",
        )
        refused = probe.returncode != 0
    except (OSError, subprocess.SubprocessError):  # e.g. a root process that gave up its capabilities
        refused = True
    if refused:
        warnings.warn(
            "grading as root: the user 'nobody' cannot run cyclelab here (its files are not readable "
            "by others), so learners' notebooks run as root; see docs/workshop.md for a container recipe",
            stacklevel=2,
        )
        return None
    return user


def hand_over(folder: Path) -> None:
    """Let the unprivileged user (if any) write ``folder`` and everything in it."""
    user = unprivileged_user()
    if user:
        for path in [folder, *Path(folder).rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)


def run_limited(
    command: list[str],
    timeout: float,
    stdin: str = "",
    limits: Limits = Limits(),
    env: dict | None = None,
    cwd: Path | None = None,
) -> Outcome:
    """Run ``command`` in its own session with ``limits`` (as ``nobody`` when root); after ``timeout`` seconds it
    gets SIGTERM, then SIGKILL; its whole process group is killed when it returns, whatever happened."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
        cwd=cwd,
        preexec_fn=_preexec(limits, unprivileged_user()),
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGTERM)  # lets contain() kill what escaped the group
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        code = None
    finally:
        _signal_group(proc.pid, signal.SIGKILL)
    return Outcome(code, out or "", err or "")


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------ inside the limited process


def descendants(pid: int | None = None) -> list[int]:
    """The ids of every live process below ``pid`` (default this one), read from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid or os.getpid()]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def kill_descendants() -> None:
    """Kill and reap every process below this one (a subreaper inherits their orphans, so none escape)."""
    for _ in range(5):
        pids = descendants()
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def prctl(option: int, value: int) -> None:
    """``prctl(option, value)`` on this process, where Linux has it; elsewhere nothing (each use is a hardening
    the grader does without)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def contain() -> None:
    """Make this process a child subreaper that kills everything below it at exit or on SIGTERM (Linux)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    atexit.register(kill_descendants)

    def stop(signum, frame) -> None:
        kill_descendants()
        os._exit(124)

    signal.signal(signal.SIGTERM, stop)
