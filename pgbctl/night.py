"""An instance's night: which processes it runs, and starting / draining / stopping them.

:func:`night_processes` is pure: for an instance and a job list it returns the
:class:`ProcessSpec` of every process (name from :mod:`pgbctl.naming`, argv, environment,
the subscription it drains, its status file). :func:`start` and :func:`end` do the I/O on the
``local`` backend through :func:`pgbctl.local.services.start_process` / ``stop_process``.

What a night runs (data-driven: a component is one entry in :data:`COMPONENTS`):

* the archive function ``upload_bytes_to_bucket`` (always), served by
  ``python -m pgbctl.functions_runtime`` from ``<survey>-alerts-upload_bytes_to_bucket[-testid]``;
* the Beam jobs of ``--jobs`` (default: every job whose code is in this checkout), each run
  by its fast local executor from ``<survey>-alerts-<job>[-testid]``.

Draining (``night end``): a process that writes a status file (:mod:`pgbctl.procstatus`) is
idle when it holds no message and did nothing for :data:`QUIET_SECONDS`; the night is drained
when every process is idle and every job subscription is empty, twice in a row. Then each
process gets SIGTERM (it finishes what it holds) and its final counts are read from its
status file, or from the JSON summary line it prints last.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from pgbctl import naming
from pgbctl.paths import REPO_ROOT

log = logging.getLogger(__name__)

__all__ = ["Component", "COMPONENTS", "ProcessSpec", "NightError", "available_jobs", "default_jobs",
           "parse_jobs", "night_processes", "start", "end", "running", "QUIET_SECONDS"]

#: a process counts as idle after this long without pulling or finishing a message
QUIET_SECONDS = 1.5


class NightError(RuntimeError):
    """A night could not be started or ended; the message is one line for the user."""


@dataclass(frozen=True)
class Component:
    """One kind of night process.

    ``kind``: ``function`` or ``beam_job`` (naming kind of its process name); ``stub``: its
    naming stub; ``subscription``: the subscription stub it drains; ``module``: run as
    ``python -m module *args``; ``requires``: repository files that must exist for the
    component to be offered (jobs written in parallel appear once their code lands).
    ``instance_args``: whether ``--survey/--testid/--project/--home`` are passed (executors)
    or the instance comes from the environment (functions).
    """

    kind: str
    stub: str
    subscription: str
    module: str
    args: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    instance_args: bool = True

    def available(self, root: Path = REPO_ROOT) -> bool:
        return all((root / r).is_file() for r in self.requires)


COMPONENTS: dict[str, Component] = {
    "upload_bytes_to_bucket": Component(
        "function", "upload_bytes_to_bucket", "alerts-upload_bytes_to_bucket", "pgbctl.functions_runtime",
        requires=("functions/upload_bytes_to_bucket/main.py",), instance_args=False),
    "bq-sink": Component("beam_job", "bq-sink", "alerts-bq-sink", "pgbctl.localrun", ("bq-sink",),
                         requires=("beam_jobs/bq_sink.py",)),
    "value-added": Component("beam_job", "value-added", "alerts-value-added", "pgbctl.localrun_value_added",
                             requires=("beam_jobs/value_added.py", "pgbctl/localrun_value_added.py")),
}
#: components every night runs, whatever ``--jobs`` says
ALWAYS: tuple[str, ...] = ("upload_bytes_to_bucket",)


def job_names() -> list[str]:
    """Every Beam job a night knows about (available in this checkout or not)."""
    return [k for k, c in COMPONENTS.items() if c.kind == "beam_job"]


def available_jobs(root: Path = REPO_ROOT) -> list[str]:
    return [k for k in job_names() if COMPONENTS[k].available(root)]


def default_jobs(root: Path = REPO_ROOT) -> list[str]:
    """The jobs ``night start`` runs without ``--jobs``: every job whose code is here."""
    return available_jobs(root)


def parse_jobs(text: str | None, root: Path = REPO_ROOT) -> list[str]:
    """``--jobs`` → job names (comma separated; ``none`` = no job). Raises ValueError (one
    line) for an unknown job or one whose code is not in this checkout."""
    if text is None:
        return default_jobs(root)
    t = text.strip()
    if t.lower() in ("", "none"):
        return []
    out: list[str] = []
    for j in (x.strip() for x in t.split(",")):
        if not j:
            continue
        if j not in job_names():
            raise ValueError(f"unknown job {j!r}; known jobs: {', '.join(job_names())} (or none)")
        if not COMPONENTS[j].available(root):
            missing = [r for r in COMPONENTS[j].requires if not (root / r).is_file()]
            raise ValueError(f"job {j!r} is not available in this checkout ({', '.join(missing)} missing)")
        if j not in out:
            out.append(j)
    return out


@dataclass(frozen=True)
class ProcessSpec:
    """One process of a night, as :func:`start` runs it."""

    name: str  # e.g. ztf-bq-sink-x (naming: beam_job / function)
    component: str  # key of COMPONENTS
    kind: str
    subscription: str  # subscription id it drains
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    status_file: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["argv"] = list(self.argv)
        d["env"] = dict(self.env)
        return d


def status_dir(home: str | Path) -> Path:
    """Where night processes write their status files (not ``procs/``: that directory holds
    only the process manager's own state)."""
    return Path(home) / "night"


def night_processes(inst: naming.Instance, jobs: Iterable[str], *, home: str | Path,
                    python: str = sys.executable, base_env: Mapping[str, str] | None = None) -> list[ProcessSpec]:
    """The processes of ``inst``'s night running ``jobs`` (pure: no I/O).

    ``home``: the local state dir (status files live under it, and executors get ``--home``);
    ``base_env``: added to every process's environment (e.g. the emulator endpoints).
    """
    jobs = list(jobs)
    for j in jobs:
        if j not in COMPONENTS or COMPONENTS[j].kind != "beam_job":
            raise ValueError(f"unknown job {j!r}; known jobs: {', '.join(job_names())}")
    out = []
    for key in (*ALWAYS, *jobs):
        c = COMPONENTS[key]
        name = inst.name(c.kind, c.stub)
        sub = inst.subscription(c.subscription)
        status = str(status_dir(home) / f"{name}.status.json")
        env = {
            **(base_env or {}),
            "PGBCTL_BACKEND": "local",
            "PGBCTL_SURVEY": inst.survey,
            "PGBCTL_TESTID": inst.testid or "",
            "GCP_PROJECT": inst.project,
            "PGBCTL_HOME": str(home),
            "PGBCTL_STATUS_FILE": status,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])]),
            "PYTHONUNBUFFERED": "1",
        }
        argv = [python, "-m", c.module, *c.args]
        if c.instance_args:
            argv += ["--survey", inst.survey, "--project", inst.project, "--home", str(home)]
            if inst.testid:
                argv += ["--testid", inst.testid]
        else:
            argv += [key, "--subscription", f"projects/{inst.project}/subscriptions/{sub}"]
        out.append(ProcessSpec(name, key, c.kind, sub, tuple(argv), env, status))
    return out


def instance_process_names(inst: naming.Instance) -> list[str]:
    """Every process name a night of ``inst`` may have started (for ``night end``)."""
    return [inst.name(c.kind, c.stub) for c in COMPONENTS.values()]


# =============================================================================================
# local I/O
# =============================================================================================


def running(inst: naming.Instance, *, home: str | Path | None = None) -> dict[str, dict]:
    """The night processes of ``inst`` that the process manager knows, by name."""
    from pgbctl.local import services

    mine = set(instance_process_names(inst))
    return {n: p.to_dict() for n, p in services.list_processes(home).items() if n in mine}


def start(specs: list[ProcessSpec], *, home: str | Path | None = None, ready_timeout: float = 120.0,
          on_progress: Callable[[str], None] | None = None) -> list[dict]:
    """Start every process of ``specs`` (a process already running with the same argv is
    left alone: idempotent) and wait until each is ready: its status file says
    ``running`` (it has set up and pulls), or, for processes without one, it is still alive
    after a few seconds. Raises :class:`NightError` naming the process and the tail of its
    log if one exits or is not ready within ``ready_timeout`` seconds (the processes of this
    call are then stopped again)."""
    from pgbctl.local import services
    from pgbctl.local.procs import log_tail

    before = services.list_processes(home)
    results: list[dict] = []
    started: list[str] = []
    for s in specs:
        was = before.get(s.name)
        already = bool(was and was.running and list(was.argv) == list(s.argv))
        if not already and s.status_file:
            Path(s.status_file).parent.mkdir(parents=True, exist_ok=True)
            Path(s.status_file).unlink(missing_ok=True)
        try:
            info = services.start_process(s.name, list(s.argv), dict(s.env), home=home, cwd=REPO_ROOT,
                                          restart_on_crash=True, max_restarts=5)
        except services.LocalServicesError as e:
            _stop_quietly(started, home)
            raise NightError(f"{s.name}: {e}") from None
        if not already:
            started.append(s.name)
        results.append({"name": s.name, "component": s.component, "subscription": s.subscription,
                        "action": "already-running" if already else "started", "pid": info.pid,
                        "log": str(info.log), "argv": list(s.argv)})
    # readiness
    from pgbctl import procstatus

    deadline = time.monotonic() + ready_timeout
    t0 = time.monotonic()
    pending = {s.name: s for s in specs}
    while pending:
        procs = services.list_processes(home)
        for name, s in list(pending.items()):
            p = procs.get(name)
            st = procstatus.read(s.status_file)
            crashed = p is None or not p.running or (name in started and (p.restarts > 0 or p.state not in (None, "running")))
            if crashed:
                tail = log_tail(p.log if p else "", 12) if p else ""
                _stop_quietly(started, home)
                raise NightError(f"{name} exited while starting (see {p.log if p else 'its log'}):\n{tail}")
            if st and st.get("state") == "running":
                pending.pop(name)
            elif not s.status_file and time.monotonic() - t0 > 3.0:
                pending.pop(name)
        if pending and time.monotonic() > deadline:
            _stop_quietly(started, home)
            raise NightError(f"not ready within {ready_timeout:.0f}s: {', '.join(pending)}")
        if pending:
            if on_progress:
                on_progress(f"waiting for {', '.join(pending)}")
            time.sleep(0.2)
    # a process that crashes right after reporting ready is caught here
    time.sleep(1.0)
    procs = services.list_processes(home)
    bad = [n for n in started if not (procs.get(n) and procs[n].running and procs[n].restarts == 0)]
    if bad:
        p = procs.get(bad[0])
        tail = log_tail(p.log, 12) if p else ""
        _stop_quietly(started, home)
        raise NightError(f"{bad[0]} exited right after starting (see {p.log if p else 'its log'}):\n{tail}")
    return results


def _stop_quietly(names: list[str], home) -> None:
    from pgbctl.local import services

    for n in names:
        try:
            services.stop_process(n, drain_timeout=10, home=home)
        except Exception:  # noqa: BLE001 - already failing; report the first error
            pass


def final_counts(log: str | Path, status_file: str | None) -> dict | None:
    """A stopped process's final counts: its status file (``state: stopped``), else the last
    JSON object line of the latest run in its log."""
    from pgbctl import procstatus

    st = procstatus.read(status_file)
    if st and st.get("state") == "stopped" and isinstance(st.get("counts"), dict):
        return st["counts"]
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return st.get("counts") if st else None
    for line in reversed(lines):
        if line.startswith("=== ") and " starting: " in line:
            break
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                d = json.loads(line)
            except ValueError:
                continue
            if isinstance(d, dict):
                return d
    return st.get("counts") if st else None


def _idle(st: dict | None, quiet: float) -> bool:
    return bool(st and st.get("state") == "running" and int(st.get("in_flight", 1)) == 0
                and time.time() - float(st.get("last_activity", 0)) >= quiet)


def drain(procs: dict[str, dict], count_waiting: Callable[[str], int | None], *, timeout: float,
          quiet: float = QUIET_SECONDS, on_progress: Callable[[str], None] | None = None,
          alive: Callable[[], set[str]] | None = None) -> tuple[bool, dict[str, int | None], float, str]:
    """Wait until the night is drained (see the module docstring). ``procs``: name ->
    ``{"subscription", "status_file"}``; ``alive()``: the names still running (a process that
    died or gave up restarting can never drain its subscription: stop waiting at once).
    Returns ``(drained, waiting per subscription, seconds, why not drained)``."""
    from pgbctl import procstatus

    t0 = time.monotonic()
    deadline = t0 + timeout
    subs = sorted({p["subscription"] for p in procs.values() if p.get("subscription")})
    streak = 0
    waiting: dict[str, int | None] = {}
    missing: list[str] = []

    def count(s: str) -> int | None:
        """Waiting messages, or None when they cannot be counted (a missing subscription --
        e.g. the Pub/Sub emulator restarted and lost the instance -- cannot drain)."""
        try:
            return count_waiting(s)
        except Exception as e:  # noqa: BLE001 - reported in the result, never a traceback
            if s not in missing:
                missing.append(s)
            log.warning("cannot count %s: %s", s, " ".join(str(e).split())[:200])
            return None

    while True:
        dead = sorted(set(procs) - alive()) if alive is not None else []
        if dead:
            waiting = {s: count(s) for s in subs}
            return False, waiting, time.monotonic() - t0, f"not running any more: {', '.join(dead)}"
        busy = [n for n, p in procs.items() if p.get("status_file")
                and not _idle(procstatus.read(p["status_file"]), quiet)]
        if not busy:
            waiting = {s: count(s) for s in subs}
            if missing:
                return False, waiting, time.monotonic() - t0, f"cannot count {', '.join(missing)} (does it exist?)"
            left = {s: n for s, n in waiting.items() if n}
            if not left:
                streak += 1
                if streak >= 2:
                    return True, waiting, time.monotonic() - t0, ""
            else:
                streak = 0
            msg = "waiting: " + ", ".join(f"{s}={n}" for s, n in left.items()) if left else "checking again"
        else:
            streak = 0
            msg = f"busy: {', '.join(busy)}"
        if time.monotonic() > deadline:
            if busy:
                waiting = {s: count(s) for s in subs}
            why = f"still busy: {', '.join(busy)}" if busy else "messages still waiting"
            return False, waiting, time.monotonic() - t0, f"not drained within {timeout:.0f}s ({why})"
        if on_progress:
            on_progress(msg)
        time.sleep(0.5 if busy else max(quiet / 2, 0.5))


def end(inst: naming.Instance, count_waiting: Callable[[str], int | None], *, home: str | Path | None = None,
        timeout: float = 300.0, drain_first: bool = True, stop_timeout: float = 60.0,
        on_progress: Callable[[str], None] | None = None) -> dict:
    """Drain (unless ``drain_first=False``) and stop ``inst``'s night processes; returns
    ``{"drained", "waited_s", "waiting", "processes": [...]}``. Stops them even when not
    drained within ``timeout`` (then ``drained`` is False and ``waiting`` says what is left).
    Idempotent: with nothing running it stops nothing."""
    from pgbctl import procstatus
    from pgbctl.local import services

    home_p = Path(home) if home is not None else None
    from pgbctl import paths

    h = home_p or paths.state_dir()
    procs = running(inst, home=home)
    alive = {n: p for n, p in procs.items() if p["running"]}
    meta: dict[str, dict] = {}
    for name in alive:
        comp = next(k for k, c in COMPONENTS.items() if inst.name(c.kind, c.stub) == name)
        sf = status_dir(h) / f"{name}.status.json"
        # a process that never wrote a status file (it does not speak the protocol) is
        # drained on its subscription alone
        meta[name] = {"component": comp, "subscription": inst.subscription(COMPONENTS[comp].subscription),
                      "status_file": str(sf) if procstatus.read(sf) else None}
    drained, waiting, waited, why = True, {}, 0.0, ""

    def still_alive() -> set[str]:
        now = running(inst, home=home)
        return {n for n, p in now.items() if p["running"]}  # (a supervised process in back-off counts)

    if alive and drain_first:
        drained, waiting, waited, why = drain(meta, count_waiting, timeout=timeout, on_progress=on_progress,
                                              alive=still_alive)
    elif not drain_first:
        drained, why = False, "not drained (--no-drain)"
    out = []
    for name, p in sorted(procs.items()):
        was_running = bool(p["running"])
        state = "not-running"
        if was_running:
            if on_progress:
                on_progress(f"stopping {name}")
            state = "stopped" if services.stop_process(name, drain_timeout=stop_timeout, home=home) else "not-running"
        else:
            services.stop_process(name, drain_timeout=5, home=home)  # clear stale state files
        sf = str(status_dir(h) / f"{name}.status.json")
        out.append({"name": name, "was_running": was_running, "result": state,
                    "counts": final_counts(p["log"], sf), "log": p["log"]})
    return {"drained": drained, "why": why, "waited_s": round(waited, 2), "waiting": waiting, "processes": out}
