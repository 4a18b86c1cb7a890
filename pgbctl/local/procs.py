"""Process plumbing for the local backend: pid/state files, process groups, ports, locks.

Every process we start is a session leader (``start_new_session=True``) so that it and
everything it forks share one process group that we can signal as a whole.  A process is
identified by ``(pid, start_ticks)`` -- the start time from ``/proc/<pid>/stat`` -- plus a
marker substring of its command line, so a stale pid file whose pid was reused by some
other program is recognised as stale and never signalled.

Linux-only (``/proc``), like the rest of the local backend.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

# Popen objects of the children started by *this* Python process, so that they are
# reaped (no zombies) and their exit codes are known.
_CHILDREN: dict[int, subprocess.Popen] = {}

LOG_ROTATE_BYTES = 64 * 1024 * 1024


@dataclass
class ProcRecord:
    """What we persist (as JSON) about a process we started."""

    name: str
    kind: str  # "service" or "process"
    pid: int
    start_ticks: int | None
    argv: list[str]
    marker: str | None
    log: str
    started_at: float
    ports: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProcRecord":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# --------------------------------------------------------------------------- /proc


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, pgid, start_ticks)`` of a live pid, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # comm (field 2) is in parentheses and may itself contain spaces or parentheses.
    rest = raw[raw.rfind(")") + 2 :].split()
    # rest[0] = state (field 3), rest[2] = pgrp (field 5), rest[19] = starttime (field 22)
    try:
        return rest[0], int(rest[2]), int(rest[19])
    except (IndexError, ValueError):
        return None


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _reap(pid: int) -> None:
    """Collect an exited child of ours so that it does not linger as a zombie."""
    p = _CHILDREN.get(pid)
    if p is not None:
        p.poll()
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int | None, start_ticks: int | None = None, marker: str | None = None) -> bool:
    """True if ``pid`` is a live (non-zombie) process that is really the one we started."""
    if not pid or pid <= 0:
        return False
    _reap(pid)
    st = proc_stat(pid)
    if st is None or st[0] in ("Z", "X", "x"):
        return False
    if start_ticks is not None and st[2] != start_ticks:
        return False  # pid reused by another process
    if marker:
        cmd = proc_cmdline(pid)
        # An empty cmdline is seen for a moment right after exec() (the parent's Popen has
        # already returned): with a matching start time the identity is certain anyway.
        if marker not in cmd and (cmd or start_ticks is None):
            return False
    return True


def record_alive(rec: ProcRecord | None) -> bool:
    return rec is not None and pid_alive(rec.pid, rec.start_ticks, rec.marker)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        st = proc_stat(pid)
        if st is None or st[1] != pgid:
            continue
        if st[0] in ("Z", "X", "x"):
            _reap(pid)
            continue
        out.append(pid)
    return out


def terminate_groups(pgids: Iterable[int], timeout: float = 10.0, kill_timeout: float = 5.0) -> dict[int, str]:
    """SIGTERM each whole process group, wait up to ``timeout`` for all of them to be gone,
    SIGKILL what is left, wait again.  Returns ``{pgid: "term" | "kill" | "gone" | "stuck"}``."""
    pgids = [g for g in set(pgids) if g and g > 1 and g != os.getpgrp()]
    result: dict[int, str] = {}
    for g in pgids:
        if not group_members(g):
            result[g] = "gone"
            continue
        try:
            os.killpg(g, signal.SIGTERM)
            result[g] = "term"
        except ProcessLookupError:
            result[g] = "gone"
    pending = [g for g in pgids if result[g] == "term"]

    def wait(groups: list[int], limit: float) -> list[int]:
        deadline = time.monotonic() + limit
        while groups and time.monotonic() < deadline:
            groups = [g for g in groups if group_members(g)]
            if groups:
                time.sleep(0.05)
        return [g for g in groups if group_members(g)]

    pending = wait(pending, timeout)
    for g in pending:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(g, signal.SIGKILL)
        result[g] = "kill"
    for g in wait(pending, kill_timeout):
        result[g] = "stuck"
    for pid in list(_CHILDREN):
        if _CHILDREN[pid].poll() is not None:
            _CHILDREN.pop(pid, None)
    return result


# --------------------------------------------------------------------------- spawning


def _rotate(log: Path) -> None:
    with contextlib.suppress(OSError):
        if log.stat().st_size > LOG_ROTATE_BYTES:
            log.replace(log.with_name(log.name + ".1"))


def spawn(argv: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> tuple[int, int | None]:
    """Start ``argv`` as a new session (own process group), output appended to ``log``.

    Returns ``(pid, start_ticks)``.  Raises FileNotFoundError/PermissionError as Popen does.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    _rotate(log)
    with open(log, "ab", buffering=0) as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting: {' '.join(argv)}\n".encode())
        p = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            close_fds=True,
        )
    _CHILDREN[p.pid] = p
    st = proc_stat(p.pid)
    return p.pid, (st[2] if st else None)


def child_returncode(pid: int) -> int | None:
    p = _CHILDREN.get(pid)
    return None if p is None else p.poll()


def log_tail(log: Path | str, n: int = 30) -> str:
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# --------------------------------------------------------------------------- ports


def free_port(preferred: int | None = None, wait: float = 3.0) -> int:
    """A free TCP port on 127.0.0.1 (``preferred`` if it is free).

    The ``preferred`` probe uses SO_REUSEADDR, as the servers themselves do (Go, Java,
    uvicorn), so a port whose old connections linger in TIME_WAIT after a restart is
    reused -- keeping a restarted service at the address clients already know.  Right after
    the old server died its port can refuse a bind for a moment (measured: ~0.1 s, while the
    kernel tears down the dead server's connections): the probe is retried for up to
    ``wait`` seconds before another port is taken."""
    if preferred:
        deadline = time.monotonic() + wait
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", preferred))
                    return preferred
                except OSError:
                    pass
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_open(port: int, timeout: float = 0.5, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- state files


class StateDir:
    """``<root>/<name>.json`` (state), ``<name>.pid`` (pid) and ``<name>.log`` (output)."""

    def __init__(self, root: Path, kind: str):
        self.root = root
        self.kind = kind
        root.mkdir(parents=True, exist_ok=True)

    def json_path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def pid_path(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def names(self) -> list[str]:
        # only "<name>.json"/"<name>.pid": a supervisor's "<name>.supervise.json" is not a process
        return sorted({p.stem for p in self.root.glob("*.json") if "." not in p.stem}
                      | {p.stem for p in self.root.glob("*.pid") if "." not in p.stem})

    def read(self, name: str) -> ProcRecord | None:
        """The record, or None.  A pid file without (readable) JSON yields a minimal record
        with no start time and no marker -- it is then treated as stale (never signalled)
        unless the pid is alive *and* its cmdline mentions ``name``."""
        try:
            return ProcRecord.from_dict(json.loads(self.json_path(name).read_text()))
        except (OSError, ValueError, TypeError):
            pass
        try:
            pid = int(self.pid_path(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return ProcRecord(name=name, kind=self.kind, pid=pid, start_ticks=None, argv=[], marker=name,
                          log=str(self.log_path(name)), started_at=0.0)

    def write(self, rec: ProcRecord) -> None:
        _atomic_write(self.json_path(rec.name), rec.to_json())
        _atomic_write(self.pid_path(rec.name), f"{rec.pid}\n")

    def clear(self, name: str) -> None:
        for p in (self.json_path(name), self.pid_path(name)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 300.0) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) held for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise TimeoutError(f"could not lock {path} within {timeout:.0f}s") from e
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
