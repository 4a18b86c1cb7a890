"""Local end-to-end benchmark: a broker night on the emulators, alert publish → archive object
and → warehouse row.

Steps (temporary PGBCTL home, services stopped at the end whatever happens)::

    pgbctl create --testid bench --yes
    pgbctl night start --survey ztf --testid bench
    (warm-up: W alerts, wait until they are archived and in the table)
    paced phase: P alerts published at 300/s (the Rubin average rate)
    burst phase: N alerts published as fast as the client can
    pgbctl night end --survey ztf --testid bench
    pgbctl delete --testid bench --yes

Alerts are synthetic ZTF-sized (~70 KB) packets with unique object/source ids, their message
attributes computed before the clock starts. The publish time of each alert is recorded when
it is handed to the publisher. "Archived" is the object's ``timeCreated`` in the
``alert_avros`` bucket (``<objectId>.<sourceId>.<topic>.avro``); "in the table" is the first
poll of ``DIASource`` (every 0.3 s, or less often when a poll is slow: the watcher keeps its
share of the warehouse's time under ~25 %) that returns its source id (the warehouse keeps no
insertion time), so table latencies are over-estimated by up to one poll interval (the
``bq_sink`` rate row's note says how long polls took).

Rows: per sink (``archive``, ``bq_sink``), the paced phase's p50/p95 latency and the burst
phase's throughput (alerts / (last landed - first published)). Target ≥ 300 alerts/s (Rubin
average), aim 1000/s. The archive rate's note gives the CPU seconds each component (the three
emulators, the archive function, bq-sink, this process) used during the burst: where the
time goes, and how much of the machine the local broker had.

``pgbctl night`` is required; without it the module reports one "skipped" row. For working
on this benchmark before ``night`` exists, ``BENCH_E2E_DIRECT=1`` starts the two components
directly (``pgbctl.functions_runtime`` and ``pgbctl.localrun``) instead of the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import create_instance, cli, local_home, log, percentile, pgbctl_exe, row, skipped

TESTID = "bench"
SURVEY = "ztf"
PACED_RATE = 300.0


def _help(*cmd: str) -> str | None:
    """``pgbctl CMD --help`` text, None if the command does not exist."""
    p = subprocess.run([*pgbctl_exe(), *cmd, "--help"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, COLUMNS="200"))
    return p.stdout if p.returncode == 0 else None


def night_available() -> bool:
    return _help("night", "start") is not None and _help("night", "end") is not None


# ---- the components -------------------------------------------------------------------------------


def _night_args(cmd: str, drain: bool = True) -> list[str]:
    """Options beyond the contract (``--survey/--testid``), passed when the command has them:
    only the archive function and bq-sink (value-added has its own benchmark, and its fits
    would compete for the cores), and a bounded drain at the end."""
    text = _help("night", cmd) or ""
    extra: list[str] = []
    if cmd == "start" and "--jobs" in text:
        extra += ["--jobs", "bq-sink"]
    if cmd == "end" and not drain and "--no-drain" in text:
        extra += ["--no-drain"]
    elif cmd == "end" and "--timeout" in text:
        extra += ["--timeout", "120"]
    return extra


def _night(cmd: str, home: Path, drain: bool = True) -> tuple[str, float]:
    """``pgbctl night start|end``; returns (the command line run, seconds it took)."""
    t0 = time.monotonic()
    if os.environ.get("BENCH_E2E_DIRECT"):
        _direct(cmd, home)
        return f"BENCH_E2E_DIRECT {cmd}", time.monotonic() - t0
    args = ["night", cmd, "--survey", SURVEY, "--testid", TESTID, *_night_args(cmd, drain)]
    log(f"e2e: pgbctl {' '.join(args)}")
    cli(["--yes", *args], home=home, timeout=600)
    dt_ = time.monotonic() - t0
    log(f"e2e: night {cmd} took {dt_:.1f}s")
    return "pgbctl " + " ".join(args), dt_


def _direct(cmd: str, home: Path) -> None:
    """Development stand-in for ``pgbctl night start|end`` (BENCH_E2E_DIRECT=1)."""
    from pgbctl import naming
    from pgbctl.local import services

    names = ("bench-archive", "bench-bq-sink")
    if cmd == "end":
        for n in names:
            services.stop_process(n, home=home)
        return
    ep = services.endpoints(home)
    inst = naming.Instance(SURVEY, TESTID, ep.project)
    env = {**ep.env(), "PGBCTL_SURVEY": SURVEY, "PGBCTL_TESTID": TESTID, "PGBCTL_BACKEND": "local",
           "GCP_PROJECT": ep.project}
    sub = f"projects/{ep.project}/subscriptions/{inst.subscription('alerts-upload_bytes_to_bucket')}"
    log("e2e: BENCH_E2E_DIRECT: starting the archive function and bq-sink directly")
    services.start_process(names[0], [sys.executable, "-m", "pgbctl.functions_runtime", "upload_bytes_to_bucket",
                                      "--subscription", sub], env, home=home)
    services.start_process(names[1], [sys.executable, "-m", "pgbctl.localrun", "bq-sink", "--survey", SURVEY,
                                      "--testid", TESTID, "--project", ep.project, "--home", str(home)],
                           env, home=home)


def _proc_logs(home: Path, lines: int = 3) -> str:
    """The last lines of the night's process logs (they go away with the temporary home)."""
    out = []
    for p in sorted((home / "procs").glob("*.log")):
        tail = [x for x in p.read_text(errors="replace").splitlines() if x.strip()][-lines:]
        log(f"e2e: {p.name}:\n  " + "\n  ".join(tail))
        out.append(f"{p.stem}: {' | '.join(tail)[-300:]}")
    return ("; logs: " + "; ".join(out)) if out else ""


_COMPONENT_MARKERS = (("pubsub-emulator", "pubsub"), ("fake-gcs-server", "storage"), ("bqemulator", "warehouse"),
                      ("functions_runtime", "archive"), ("localrun", "bq-sink"), ("supervise.py", None))


def _cpu_seconds(home: Path) -> dict[str, float]:
    """CPU seconds (user + system) so far of each local service and night process of ``home``,
    by component, and of this process (``bench``: publisher + watcher)."""
    import resource

    from pgbctl.local import services

    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in services.all_pids(home):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name = next((n for m, n in _COMPONENT_MARKERS if m in cmd), "other")
        if name is None:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["bench"] = ru.ru_utime + ru.ru_stime
    return out


def _cpu_note(before: dict[str, float], after: dict[str, float], wall: float) -> str:
    used = {k: after[k] - before.get(k, 0.0) for k in after}
    parts = [f"{k} {v:.0f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]) if v >= 0.5]
    return (f"CPU s over the {wall:.0f} s burst: " + ", ".join(parts)
            + f" (= {sum(used.values()) / wall:.1f} of {os.cpu_count()} cores)")


# ---- observing the sinks ---------------------------------------------------------------------------


class Watcher:
    """Polls the archive bucket and the DIASource table in a thread; first-seen times per
    source id.

    Bucket: the object's ``timeCreated`` (server time, microseconds), so the bucket is listed
    only every ``bucket_every`` seconds, to notice completion. Table: the time of the first
    poll that returns the id; a poll runs every ``every`` seconds, or less often when polls
    are slow (at most a quarter of the time is spent polling: the watcher must not slow the
    warehouse down). Poll counts and durations are kept in ``polls``."""

    def __init__(self, clients, inst, smap, every: float = 0.3, bucket_every: float = 2.0):
        self.clients, self.inst, self.every, self.bucket_every = clients, inst, every, bucket_every
        self.window = (0, 2**63 - 1)  # source ids of the current phase (keeps the polls small)
        self._table_count = -1
        self.polls = {"table": [0, 0.0], "bucket": [0, 0.0]}  # count, seconds
        self.bucket = inst.bucket("alert_avros")
        self.table = inst.table("DIASource")
        self.sid = smap["sourceId"]
        self.archived: dict[int, float] = {}
        self.in_table: dict[int, float] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, name="bench-e2e-watch", daemon=True)

    def start(self) -> "Watcher":
        self._t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._t.join(timeout=60)

    def poll_bucket(self) -> None:
        for b in self.clients.storage.list_blobs(self.bucket, fields="items(name,timeCreated),nextPageToken"):
            parts = b.name.split(".")
            if len(parts) >= 3:
                try:
                    sid = int(parts[1])
                except ValueError:
                    continue
                if sid not in self.archived:
                    tc = b.time_created
                    self.archived[sid] = tc.timestamp() if tc else time.time()

    def poll_table(self) -> None:
        now = time.time()
        bq = self.clients.bigquery
        lo, hi = self.window
        where = f"WHERE `{self.sid}` BETWEEN {lo} AND {hi}"
        n = next(iter(bq.query(f"SELECT COUNT(*) AS n FROM `{self.table}` {where}").result(timeout=60)))["n"]
        if n == self._table_count:
            return
        self._table_count = n
        for r in bq.query(f"SELECT `{self.sid}` AS sid FROM `{self.table}` {where}").result(timeout=60):
            sid = int(r["sid"])
            if sid not in self.in_table:
                self.in_table[sid] = now

    def _poll(self, name: str, fn) -> float:
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a poll failing is retried; reported if it persists
            msg = f"{name} poll: {type(e).__name__}: {' '.join(str(e).split())[:150]}"
            if msg not in self.errors:
                self.errors.append(msg)
        dt_ = time.monotonic() - t0
        self.polls[name][0] += 1
        self.polls[name][1] += dt_
        return dt_

    def _loop(self) -> None:
        next_table = next_bucket = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_table:
                took = self._poll("table", self.poll_table)
                next_table = time.monotonic() + max(self.every, 3 * took)
            if now >= next_bucket:
                took = self._poll("bucket", self.poll_bucket)
                next_bucket = time.monotonic() + max(self.bucket_every, 3 * took)
            self._stop.wait(max(0.01, min(next_table, next_bucket) - time.monotonic()))

    def poll_note(self) -> str:
        (nt, st), (nb, sb) = self.polls["table"], self.polls["bucket"]
        return (f"watcher: table polled {nt}x ({1000 * st / max(nt, 1):.0f} ms each = table latency resolution), "
                f"bucket listed {nb}x ({1000 * sb / max(nb, 1):.0f} ms each)")

    def watch(self, sids) -> None:
        """Restrict the table poll to this phase's source ids."""
        self.window = (min(sids), max(sids))

    def wait_for(self, sids: list[int], timeout: float, home: Path | None = None) -> bool:
        """Until every one of ``sids`` is archived and in the table (True), ``timeout`` runs
        out or (with ``home``) a process of the night has exited (False)."""
        deadline = time.monotonic() + timeout
        want = set(sids)
        checked = time.monotonic()
        while time.monotonic() < deadline:
            if want <= self.archived.keys() and want <= self.in_table.keys():
                return True
            if home is not None and time.monotonic() - checked > 2:
                checked = time.monotonic()
                if _exited(home):
                    return False
            time.sleep(0.2)
        return False


def _exited(home: Path) -> list[str]:
    """Names of the night's processes that are no longer running."""
    from pgbctl.local import services

    return [n for n, p in services.list_processes(home).items()
            if not p.running and p.argv and not n.endswith(".supervise")]


# ---- publishing -----------------------------------------------------------------------------------


def _prepare(n: int, seed: int = 5):
    """``[(sid, data, attributes)]`` of ``n`` unique ZTF-sized synthetic alerts."""
    from pgbctl import schemamap, simulate, synth

    smap = schemamap.load(SURVEY)
    out = []
    for data in synth.iter_generate(n, seed=seed, survey=SURVEY, cutout_bytes=20_000):
        attrs = simulate.attributes_for(data, smap)
        out.append((int(attrs["candid"]), data, attrs))
    return out


def _publish(clients, topic: str, alerts, rate: float | None) -> dict[int, float]:
    """Publish (paced at ``rate``/s, or as fast as possible); hand-over time per source id."""
    sent: dict[int, float] = {}
    futures = []
    start = time.monotonic()
    for i, (sid, data, attrs) in enumerate(alerts):
        if rate:
            wait = start + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        sent[sid] = time.time()
        futures.append(clients.publisher.publish(topic, data, **attrs))
    for f in futures:
        f.result(timeout=300)
    return sent


def _latency_rows(phase: str, sent: dict[int, float], w: Watcher, rate_note: str) -> list[dict]:
    out = []
    for sink, seen in (("archive", w.archived), ("bq_sink", w.in_table)):
        lat = [seen[s] - t for s, t in sent.items() if s in seen]
        missing = len(sent) - len(lat)
        miss = f"; {missing} of {len(sent)} never landed" if missing else ""
        for q in (50, 95):
            v = percentile(lat, q)
            out.append(row(f"e2e.{sink}.{phase}_latency_p{q}", v, "s", None,
                           f"publish → {'object in bucket' if sink == 'archive' else 'row in DIASource'}, "
                           f"{len(sent)} alerts {rate_note}{miss}"))
    return out


def _throughput_rows(phase: str, sent: dict[int, float], w: Watcher, publish_s: float) -> list[dict]:
    out = []
    t0 = min(sent.values())
    pub_rate = len(sent) / publish_s if publish_s > 0 else None
    for sink, seen in (("archive", w.archived), ("bq_sink", w.in_table)):
        landed = [seen[s] for s in sent if s in seen]
        missing = len(sent) - len(landed)
        v = len(landed) / (max(landed) - t0) if landed and max(landed) > t0 else None
        miss = f"; {missing} of {len(sent)} never landed" if missing else ""
        out.append(row(f"e2e.{sink}.{phase}_rate", v, "alerts/s", ">= 300",
                       f"{len(sent)} alerts published at {pub_rate:.0f}/s; alerts / (last landed - first "
                       f"published); aim 1000/s{miss}"))
    return out


def run(quick: bool) -> list[dict]:
    names = ["e2e.archive.burst_rate", "e2e.bq_sink.burst_rate"]
    if not os.environ.get("BENCH_E2E_DIRECT") and not night_available():
        return [skipped(n, "night not available (pgbctl night start/end)", "alerts/s", ">= 300") for n in names]

    from pgbctl import naming, schemamap
    from pgbctl.clients import Clients
    from pgbctl.local import services

    n_warm, n_paced, n_burst = (20, 600, 1000) if quick else (50, 3000, 5000)
    log(f"e2e: generating {n_warm + n_paced + n_burst} ZTF-sized alerts")
    t0 = time.monotonic()
    alerts = _prepare(n_warm + n_paced + n_burst)
    log(f"e2e: generated in {time.monotonic() - t0:.1f}s")
    warm, paced, burst = alerts[:n_warm], alerts[n_warm:n_warm + n_paced], alerts[n_warm + n_paced:]
    smap = schemamap.load(SURVEY)
    out: list[dict] = []
    with local_home("pgbctl-bench-e2e-") as home:
        ep0 = services.endpoints(home)
        clients = None
        watcher = None
        measured = False
        try:
            log("e2e: pgbctl create --testid bench")
            create_note = create_instance(TESTID, home=home)
            night_cmd, start_s = _night("start", home)
            try:
                # clients only now: create/night start may restart services (bucket notifications)
                ep = services.endpoints(home)
                if ep != ep0:
                    log(f"e2e: endpoints changed during create/night start: {ep0} -> {ep}")
                clients = Clients.for_backend("local", ep.project, ep)
                inst = naming.Instance(SURVEY, TESTID, ep.project)
                topic = clients.topic_path(inst.topic("alerts"))
                watcher = Watcher(clients, inst, smap).start()
                t0 = time.monotonic()
                watcher.watch([a[0] for a in warm])
                _publish(clients, topic, warm, None)
                limit = 120 if quick else 180
                ok = watcher.wait_for([a[0] for a in warm], timeout=limit, home=home)
                warm_s = time.monotonic() - t0
                log(f"e2e: warm-up {'done' if ok else 'NOT done'} in {warm_s:.1f}s")
                if not ok:
                    dead = _exited(home)
                    why = (f"process(es) exited: {', '.join(dead)}" if dead else
                           "; ".join(watcher.errors[:2]) or f"the warm-up alerts did not land within {limit} s")
                    raise RuntimeError(f"night is not processing alerts: {why} (archived {len(watcher.archived)}, "
                                       f"in table {len(watcher.in_table)} of {n_warm}){_proc_logs(home)}")

                log(f"e2e: paced phase, {n_paced} alerts at {PACED_RATE:g}/s")
                watcher.watch([a[0] for a in paced])
                sent = _publish(clients, topic, paced, PACED_RATE)
                done = watcher.wait_for(list(sent), timeout=60 + n_paced / 50)
                out += _latency_rows("paced", sent, watcher, f"published at {PACED_RATE:g}/s")
                if not done:
                    log("e2e: paced phase did not complete")

                log(f"e2e: burst phase, {n_burst} alerts")
                watcher.watch([a[0] for a in burst])
                cpu0 = _cpu_seconds(home)
                t1 = time.monotonic()
                sent = _publish(clients, topic, burst, None)
                publish_s = time.monotonic() - t1
                done = watcher.wait_for(list(sent), timeout=60 + n_burst / 20)
                burst_s = time.monotonic() - t1
                cpu_note = _cpu_note(cpu0, _cpu_seconds(home), burst_s)
                log(f"e2e: burst landed {'fully' if done else 'PARTLY'} in {burst_s:.1f}s; {cpu_note}")
                measured = True
                out = _throughput_rows("burst", sent, watcher, publish_s) + out
                out[0]["note"] += f"; {cpu_note}"
                out += _latency_rows("burst", sent, watcher, f"published in a burst ({publish_s:.1f}s)")
                if watcher.errors:
                    out[0]["note"] += f"; poll errors: {'; '.join(watcher.errors[:2])}"
                out[0]["note"] += f"; night: {night_cmd}"
                out[1]["note"] += f"; {watcher.poll_note()}"
                out.append(row("e2e.night_start", start_s, "s", None,
                               f"`{night_cmd}` until it returned; then {warm_s:.1f}s until {n_warm} "
                               f"warm-up alerts were archived and in the table"))
                if create_note:
                    out[0]["note"] += f"; {create_note}"
            finally:
                if watcher:
                    watcher.stop()
                try:
                    end_cmd, end_s = _night("end", home, drain=measured)
                    if measured:
                        out.append(row("e2e.night_end", end_s, "s", None,
                                       f"`{end_cmd}` (drain and stop) after every alert had landed"))
                except Exception as e:  # noqa: BLE001 - reported, but must not hide what happened before
                    log(f"e2e: night end failed: {e}")
                    if out:
                        out[0]["note"] += f"; night end failed: {str(e)[:200]}"
        finally:
            try:
                log("e2e: pgbctl delete --testid bench")
                cli(["delete", "--testid", TESTID, "--yes"], home=home, check=False, timeout=300)
            finally:
                if clients is not None:
                    clients.close()
    return out
