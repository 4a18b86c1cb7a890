"""Fast local executor of the value-added job: the job's DoFns, in micro-batches, on the emulators.

    python -m pgbctl.localrun_value_added --survey ztf --testid x --project P [--exit-when-idle S]

The streaming DirectRunner manages ~220 messages/s and acknowledges before processing; this
runs the SAME DoFns (:mod:`beam_jobs.value_added`: ``DecodeAlert``, ``PrepareAlert``,
``FilterAlerts`` x2, ``ToMessage``, ``FitSalt2``, ``Salt2Outputs``) in-process:

1. a producer thread pulls up to ``--batch`` messages from ``<survey>-alerts-value-added[-testid]``
   and runs them through the DoFns (in this process, or split over ``--workers`` processes);
2. the main thread writes the previous batch meanwhile: drops alerts whose source id was seen
   within ``--dedup-minutes`` (as the job's dedup stage does) and salt2 rows already in the
   table (one query per batch), publishes to ``alerts_pure`` / ``exgalac_trans`` / ``salt2``,
   inserts the ``salt2`` rows (insert ids = source ids), uploads the PNGs to the ``sncosmo``
   bucket, writes dead letters -- and only then acknowledges the batch. A failure leaves the
   batch unacknowledged (redelivered later; publishing is at-least-once, rows exactly once).

Messages held longer than the subscription's ack deadline have their deadline extended. The
SALT2 model is loaded before the first pull: missing model files stop the executor at start
with one message (exit code 2).

SIGTERM/SIGINT: the batch being written is finished and acknowledged, a batch pulled but not
written is handed back; exit code 0. Count lines go to stderr every ``--log-every`` seconds; a
final JSON summary line is printed on stdout. With ``$PGBCTL_STATUS_FILE`` (or
``--status-file``) set, the status file of :mod:`pgbctl.procstatus` is kept (``running`` once
set up and pulling; ``in_flight``; counts; ``stopped`` with the final counts) -- what
``pgbctl night`` waits on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pgbctl import naming
from pgbctl.clients import ack_all, nack_all
from pgbctl.localrun import BatchCounts

log = logging.getLogger("pgbctl.localrun_value_added")

JOB = "value-added"
TOPICS = ("alerts_pure", "exgalac_trans", "salt2")
ACK_EXTEND_SECONDS = 60
ACK_EXTEND_EVERY = 20.0


def _beam_jobs():
    """``beam_jobs.value_added`` (the repository root goes on sys.path when needed: beam_jobs
    is not an installed package)."""
    try:
        from beam_jobs import value_added
    except ModuleNotFoundError:
        from pgbctl.paths import REPO_ROOT

        sys.path.insert(0, str(REPO_ROOT))
        from beam_jobs import value_added
    return value_added


# =============================================================================================
# the DoFns, driven in-process (no I/O)
# =============================================================================================


@dataclass
class AlertResult:
    """Everything the job produced for one message."""

    source_id: Any = None
    object_id: Any = None
    messages: list = field(default_factory=list)  # (topic stub, data, attributes)
    row: dict | None = None
    figure: tuple | None = None  # (object name, png bytes)
    rejections: list = field(default_factory=list)  # (filter, reasons)
    dead: list = field(default_factory=list)
    fit: str | None = None  # None | "ok" | "failed"
    fit_seconds: float = 0.0
    plot_failed: bool = False


def _outputs(fn, element) -> tuple[list, dict[str, list]]:
    from apache_beam import pvalue

    main, tagged = [], {}
    for o in fn.process(element) or ():
        if isinstance(o, pvalue.TaggedOutput):
            tagged.setdefault(o.tag, []).append(o.value)
        else:
            main.append(o)
    return main, tagged


class Processor:
    """The value-added DoFns set up once and applied to one message at a time (pure: no I/O).

    ``process(data, attributes, message_id)`` -> :class:`AlertResult`. Used by the executor
    (in-process or in worker processes) and by the benchmark.
    """

    def __init__(self, inst: naming.Instance, cfg=None, *, model_data: str | None = None, plots: bool = True):
        va = _beam_jobs()
        from beam_jobs.common import DecodeAlert

        self.va = va
        self.inst = inst
        stage = va.STAGE
        self.decode = DecodeAlert(inst.survey, stage)
        self.prepare = va.PrepareAlert(inst.survey, stage)
        self.purity = va.FilterAlerts(inst.survey, "purity", cfg, stage)
        self.exgal = va.FilterAlerts(inst.survey, "exgal", cfg, stage)
        self.to_msg = {t: va.ToMessage(t, stage) for t in (va.TOPIC_PURE, va.TOPIC_EXGAL)}
        self.fit = va.FitSalt2(inst.survey, cfg, model_data, stage)
        self.outputs = va.Salt2Outputs(inst.survey, inst.bucket(va.FIGURE_BUCKET), va.salt2_schema(inst.survey),
                                       cfg, model_data, stage, plots)
        # setup order: the model first -- a missing model must stop us before anything else
        for fn in (self.fit, self.outputs, self.decode, self.prepare, self.purity, self.exgal,
                   *self.to_msg.values()):
            fn.setup()

    def process(self, data: bytes, attributes: dict | None = None, message_id: str = "") -> AlertResult:
        from apache_beam.io.gcp.pubsub import PubsubMessage

        from beam_jobs.common import DEAD_LETTER

        va = self.va
        r = AlertResult()
        decoded, t = _outputs(self.decode, PubsubMessage(data, dict(attributes or {}), message_id=message_id))
        r.dead += t.get(DEAD_LETTER, [])
        if not decoded:
            return r
        prepared, t = _outputs(self.prepare, decoded[0])
        r.dead += t.get(DEAD_LETTER, [])
        if not prepared:
            return r
        a = prepared[0]
        r.source_id, r.object_id = a.source_id, a.object_id
        for fn, topic in ((self.purity, va.TOPIC_PURE), (self.exgal, va.TOPIC_EXGAL)):
            passed, t = _outputs(fn, a)
            r.rejections += [(x.filter, x.reasons) for x in t.get(va.REJECTED, [])]
            if not passed:
                continue
            msgs, t2 = _outputs(self.to_msg[topic], a)
            r.dead += t2.get(DEAD_LETTER, [])
            r.messages += [(topic, m.data, dict(m.attributes)) for m in msgs]
            if topic != va.TOPIC_EXGAL:
                continue
            t0 = time.perf_counter()
            fitted, t3 = _outputs(self.fit, a)
            r.rejections += [(x.filter, x.reasons) for x in t3.get(va.REJECTED, [])]
            for f in fitted:
                r.fit = "ok" if f.result.success else "failed"
                msgs, t4 = _outputs(self.outputs, f)
                r.messages += [(va.TOPIC_SALT2, m.data, dict(m.attributes)) for m in msgs]
                rows = t4.get("salt2_rows", [])
                r.row = rows[0] if rows else None
                figs = t4.get("figures", [])
                r.figure = figs[0] if figs else None
                r.plot_failed = bool(f.result.success and self.outputs.plots and not figs)
                r.dead += t4.get(DEAD_LETTER, [])
            r.fit_seconds = time.perf_counter() - t0
        return r

    def process_many(self, items: list[tuple[bytes, dict, str]]) -> list[AlertResult]:
        return [self.process(*it) for it in items]


def job_rate(packets: list[bytes], inst: naming.Instance | None = None, *, cfg=None, model_data: str | None = None,
             plots: bool = True) -> dict:
    """Speed of the job's DoFn chain in this process, without I/O: decode, strip, both
    filters, JSON messages, quality gate, SALT2 fit, salt2 row and PNG, for every packet
    (one warm-up packet untimed). Returns ``{alerts, seconds, alerts_per_s, fits,
    fit_succeeded, ms_per_fitted_alert}`` (fit + row + plot time per fitted alert)."""
    inst = inst or naming.Instance("ztf", "bench", "pgbctl-local")
    proc = Processor(inst, cfg, model_data=model_data, plots=plots)
    if packets:
        proc.process(packets[0])
    t0 = time.perf_counter()
    results = [proc.process(p) for p in packets]
    dt = time.perf_counter() - t0
    fits = [r for r in results if r.fit is not None]
    return {
        "alerts": len(packets),
        "seconds": dt,
        "alerts_per_s": len(packets) / dt if dt > 0 else None,
        "fits": len(fits),
        "fit_succeeded": sum(r.fit == "ok" for r in fits),
        "ms_per_fitted_alert": 1000 * sum(r.fit_seconds for r in fits) / len(fits) if fits else None,
    }


# worker processes (--workers > 1): one Processor per process
_WORKER: Processor | None = None


def _init_worker(inst: naming.Instance, cfg, model_data: str | None, plots: bool, log_level: int) -> None:
    global _WORKER
    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    logging.getLogger("beam_jobs.value_added").setLevel(log_level)
    parent = os.getppid()

    def orphaned():  # the parent was killed without shutting the pool down: do not linger
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=orphaned, name="parent-watch", daemon=True).start()
    _WORKER = Processor(inst, cfg, model_data=model_data, plots=plots)


def _work(items: list[tuple[bytes, dict, str]]) -> list[AlertResult]:
    assert _WORKER is not None
    return _WORKER.process_many(items)


# =============================================================================================
# counts
# =============================================================================================


@dataclass
class Counts(BatchCounts):
    published: dict[str, int] = field(default_factory=lambda: {t: 0 for t in TOPICS})
    rows_salt2: int = 0
    figures: int = 0
    fits: int = 0
    fit_succeeded: int = 0
    fit_failed: int = 0
    plot_failed: int = 0
    fit_seconds: float = 0.0
    rejected: dict[str, Counter] = field(default_factory=lambda: {k: Counter() for k in ("purity", "exgal", "quality")})

    def as_dict(self) -> dict[str, Any]:
        return {
            "in": self.messages,
            **{t: n for t, n in self.published.items()},
            "rows_salt2": self.rows_salt2,
            "figures": self.figures,
            "fits": self.fits,
            "fit_succeeded": self.fit_succeeded,
            "fit_failed": self.fit_failed,
            "plot_failed": self.plot_failed,
            "rejected": {k: dict(sorted(v.items())) for k, v in self.rejected.items()},
            **self.common(),
            "ms_per_fit": round(1000 * self.fit_seconds / self.fits, 1) if self.fits else None,
        }

    def line(self) -> str:
        d = self.as_dict()
        rate = f" {d['alerts_per_s']}/s" if d["alerts_per_s"] else ""
        return (f"in={d['in']} pure={d['alerts_pure']} exgal={d['exgalac_trans']} fits={d['fits']} "
                f"(ok={d['fit_succeeded']} failed={d['fit_failed']}) salt2={d['salt2']} rows={d['rows_salt2']} "
                f"png={d['figures']} dup={d['duplicates']} dead_letters={d['dead_letters']} "
                f"batches={d['batches']}{rate}")


# =============================================================================================
# the executor
# =============================================================================================


@dataclass
class Batch:
    ack_ids: list[str]
    results: list[AlertResult]
    n_in: int
    hold_key: int | None = None  # the ack ids' entry in the lease table


class _Seen:
    """Source ids seen within the last ``seconds`` (the job's dedup window)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._t: dict[Any, float] = {}
        self._last_prune = time.monotonic()

    def __contains__(self, sid) -> bool:
        t = self._t.get(sid)
        return t is not None and time.monotonic() - t <= self.seconds

    def add(self, sid) -> None:
        now = time.monotonic()
        self._t[sid] = now
        if now - self._last_prune > 60:
            self._t = {k: v for k, v in self._t.items() if now - v <= self.seconds}
            self._last_prune = now


class ValueAddedExecutor:
    """The fast local executor of value-added (see the module docstring).

    ``run(stop, exit_when_idle=..., log_every=..., max_messages=...)`` -> counts dict, the
    same shape as :class:`pgbctl.localrun.BqSinkExecutor`.
    """

    def __init__(self, inst: naming.Instance, clients, *, cfg=None, model_data: str | None = None,
                 batch: int = 200, max_wait: float = 0.5, workers: int = 1, plots: bool = True,
                 dedup_minutes: float = 10.0, upload_threads: int = 8):
        va = _beam_jobs()

        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.va = va
        self.inst = inst
        self.clients = clients
        self.batch = batch
        self.max_wait = max_wait
        self.workers = workers
        self.pull_timeout = 2.0
        self._quiet_pull_warning()  # the emulator honours it; Pub/Sub's deprecation is moot here
        self.cfg = cfg if cfg is not None else va.load_science_config(None, inst.survey)
        self.model_data = model_data if model_data is not None else va.default_model_data("local", inst)
        self.subscription = clients.subscription_path(inst.subscription(va.SUBSCRIPTION))
        self.topics = {t: clients.topic_path(inst.topic(t)) for t in TOPICS}
        self.table = inst.table(va.SALT2_TABLE)
        self._check_table()
        # the model first: ModelDataError here stops us before the first pull
        self.processor = Processor(inst, self.cfg, model_data=self.model_data, plots=plots)
        self.pool = None
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent holds gRPC channels and threads
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker,
                                            initargs=(inst, self.cfg, self.model_data, plots,
                                                      logging.getLogger("beam_jobs.value_added").getEffectiveLevel()))
            for f in [self.pool.submit(_work, []) for _ in range(workers)]:
                f.result(timeout=300)  # workers up (model loaded) before the first pull
        self._writers(clients)
        self.upload_threads = upload_threads
        self.seen = _Seen(dedup_minutes * 60.0)
        self.counts = Counts()
        self._store = None  # Clients for storage once the emulator moved (refresh_storage)
        self._held: dict[int, list[str]] = {}  # batch id -> ack ids not yet acked/nacked
        self._held_lock = threading.Lock()
        self._last_activity: float | None = None  # wall time of the last pull/ack (status file)

    def _writers(self, clients) -> None:
        va = self.va
        from beam_jobs.common import WriteDeadLetters

        # a short retry: a storage emulator that went away fails the batch soon (redelivered,
        # after refresh_storage) instead of holding everything for 120 s
        self.figures = va.UploadFigures(self.inst, clients.backend, clients=clients, retry_timeout=20.0)
        self.figures.setup()
        self.dead_letters = WriteDeadLetters(self.inst, clients.backend, clients=clients)
        self.dead_letters.setup()

    def refresh_storage(self) -> bool:
        """Locally, ``pgbctl create`` of another instance restarts the storage emulator
        (its notification settings), possibly on another port: after a failed batch, point
        the figure and dead-letter writers at the current address (checked before every
        batch, and after a failed one). True if it had moved."""
        ep = getattr(self.clients, "endpoints", None)
        if ep is None or not getattr(ep, "home", None):
            return False
        try:
            from pgbctl.local import services

            now = services.endpoints(ep.home, project=self.inst.project)
        except Exception:  # noqa: BLE001 - services down: the next batch will tell
            return False
        current = self._store.endpoints if self._store is not None else ep
        if now.storage_url == current.storage_url:
            return False
        from pgbctl.clients import Clients

        log.warning("storage emulator moved %s -> %s; following it", current.storage_url, now.storage_url)
        if self._store is not None:
            self._store.close()
        self._store = Clients.for_backend("local", self.inst.project, now)
        self._writers(self._store)
        return True

    def _check_table(self) -> None:
        from google.api_core import exceptions as gexc

        try:
            self.clients.bigquery.get_table(self.table)
        except gexc.NotFound:
            raise RuntimeError(f"table {self.table} does not exist: run `pgbctl create` for {self.inst.label} "
                               "first") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    # ---- pull + DoFns (producer thread) -------------------------------------------------------

    @staticmethod
    def _quiet_pull_warning() -> None:
        import warnings

        warnings.filterwarnings("ignore", "The return_immediately flag is deprecated", DeprecationWarning)

    def pull(self, stop: threading.Event) -> list:
        """Up to ``batch`` messages. The first pull waits briefly for messages (the emulator
        holds an empty pull until its deadline: kept short so that idling and SIGTERM are
        noticed); the pulls that fill the batch up return at once."""
        got: list = []
        deadline = time.monotonic() + self.max_wait
        while len(got) < self.batch and not stop.is_set():
            resp = self.clients.subscriber.pull(
                request={"subscription": self.subscription, "max_messages": min(1000, self.batch - len(got)),
                         "return_immediately": bool(got)},
                timeout=self.pull_timeout)
            got.extend(resp.received_messages)
            if not resp.received_messages or time.monotonic() > deadline:
                break
        return got

    def prepare(self, received: list) -> Batch:
        items = [(rm.message.data, dict(rm.message.attributes), rm.message.message_id) for rm in received]
        if self.pool is None or len(items) < 2 * self.workers:
            results = self.processor.process_many(items)
        else:
            n = -(-len(items) // self.workers)
            chunks = [items[i:i + n] for i in range(0, len(items), n)]
            results = [r for part in self.pool.map(_work, chunks) for r in part]
        return Batch([rm.ack_id for rm in received], results, len(received))

    # ---- writing (main thread) ----------------------------------------------------------------

    def existing_rows(self, ids: list[int]) -> set[int]:
        """Source ids among ``ids`` that already have a salt2 row (one query)."""
        from google.cloud import bigquery

        if not ids:
            return set()
        cfg = bigquery.QueryJobConfig(query_parameters=[bigquery.ArrayQueryParameter("ids", "INT64", ids)])
        q = f"SELECT candid FROM `{self.table}` WHERE candid IN UNNEST(@ids)"
        return {int(r["candid"]) for r in self.clients.bigquery.query(q, job_config=cfg).result(timeout=120)}

    def insert_rows(self, rows: list[dict]) -> list[tuple[dict, str]]:
        """Insert salt2 rows (insert ids = candid); the rows refused, with the reason. Errors of
        the request itself raise (the batch is redelivered)."""
        if not rows:
            return []
        errors = self.clients.bigquery.insert_rows_json(self.table, rows, row_ids=[str(r["candid"]) for r in rows],
                                                        timeout=120)
        failed = []
        for e in errors or []:
            msg = "; ".join(" ".join(str(x.get(k)) for k in ("reason", "location", "message") if x.get(k))
                            for x in e.get("errors", [])[:3])
            failed.append((rows[e["index"]], f"salt2: warehouse refused the row: {msg}"))
        return failed

    def write(self, b: Batch) -> None:
        """Publish, insert, upload, dead-letter, then ack. Raises if the batch could not be written."""
        from concurrent.futures import ThreadPoolExecutor

        from beam_jobs.common import dead_letter

        va = self.va
        self.refresh_storage()  # one small file read: follows a restarted storage emulator
        fresh: list[AlertResult] = []
        in_batch: set = set()
        dups = 0
        dead: list[dict] = []
        for r in b.results:
            dead += r.dead
            if r.source_id is None:
                continue
            if r.source_id in in_batch or r.source_id in self.seen:
                dups += 1
                continue
            in_batch.add(r.source_id)
            fresh.append(r)
        # salt2 rows: not twice (a redelivered batch finds its rows)
        rows = [r.row for r in fresh if r.row is not None]
        present = self.existing_rows([int(x["candid"]) for x in rows]) if rows else set()
        rows = [x for x in rows if int(x["candid"]) not in present]
        refused = self.insert_rows(rows)
        by_sid = {r.source_id: r for r in fresh}
        for row, reason in refused:
            r = by_sid.get(row["candid"])
            attrs = {"table": va.SALT2_TABLE, "candid": str(row["candid"])}
            dead.append(dead_letter(va.STAGE, reason, attributes=attrs, row=row, table=va.SALT2_TABLE,
                                    key=str(row["candid"])))
            if r is not None:
                r.messages = [m for m in r.messages if m[0] != va.TOPIC_SALT2]
        # messages and figures
        publisher = self.clients.publisher
        futures = []
        published = Counter()
        for r in fresh:
            for topic, data, attrs in r.messages:
                futures.append(publisher.publish(self.topics[topic], data, **attrs))
                published[topic] += 1
        figures = [r.figure for r in fresh if r.figure is not None]
        if figures:
            with ThreadPoolExecutor(min(self.upload_threads, len(figures))) as ex:
                list(ex.map(lambda f: self.figures.upload(*f), figures))
        for f in futures:
            f.result(timeout=60)
        if dead:
            self.dead_letters.write(dead)
        self.ack(b.ack_ids)
        for r in fresh:
            self.seen.add(r.source_id)
        c = self.counts
        c.messages += b.n_in
        for t, n in published.items():
            c.published[t] += n
        c.rows_salt2 += len(rows) - len(refused)
        c.figures += len(figures)
        c.duplicates += dups
        c.dead_letters += len(dead)
        for r in fresh:
            for which, reasons in r.rejections:
                c.rejected.setdefault(which, Counter()).update(reasons)
            if r.fit is not None:
                c.fits += 1
                c.fit_seconds += r.fit_seconds
                c.fit_succeeded += r.fit == "ok"
                c.fit_failed += r.fit == "failed"
            c.plot_failed += r.plot_failed
        c.batches += 1
        c.last_write = time.monotonic()

    def ack(self, ack_ids: list[str]) -> None:
        ack_all(self.clients.subscriber, self.subscription, ack_ids)

    def nack(self, ack_ids: list[str]) -> None:
        nack_all(self.clients.subscriber, self.subscription, ack_ids)

    def _holding(self) -> bool:
        with self._held_lock:
            return bool(self._held)

    def status(self) -> dict:
        """For the status file (:mod:`pgbctl.procstatus`): messages pulled and not yet acked
        or handed back, the wall time of the last pull/ack, the counts."""
        with self._held_lock:
            in_flight = sum(len(ids) for ids in self._held.values())
            last = self._last_activity
        return {"in_flight": in_flight, "last_activity": last, "counts": self.counts.as_dict()}

    def _extend_leases(self) -> None:
        with self._held_lock:
            ids = [a for ids in self._held.values() for a in ids]
        for i in range(0, len(ids), 500):
            try:
                self.clients.subscriber.modify_ack_deadline(request={
                    "subscription": self.subscription, "ack_ids": ids[i:i + 500],
                    "ack_deadline_seconds": ACK_EXTEND_SECONDS})
            except Exception as e:  # noqa: BLE001
                log.warning("ack deadline extension failed: %s", e)

    # ---- the loop -----------------------------------------------------------------------------

    def run(self, stop: threading.Event, *, exit_when_idle: float | None = None, log_every: float = 10.0,
            max_messages: int | None = None, status_file: str | None = None) -> dict:
        """Pull + DoFns in one thread, write + ack in this one, until ``stop`` (or idle for
        ``exit_when_idle`` s, or ``max_messages``). Writes the status file
        (:mod:`pgbctl.procstatus`; default ``$PGBCTL_STATUS_FILE``) meanwhile. Returns the
        final counts."""
        from pgbctl import procstatus

        q: queue.Queue = queue.Queue(maxsize=1)
        producer_stop = threading.Event()
        errors: list[BaseException] = []
        seq = iter(range(1 << 62))

        def hold(ack_ids):
            k = next(seq)
            with self._held_lock:
                self._held[k] = ack_ids
                self._last_activity = time.time()
            return k

        def release(k):
            with self._held_lock:
                self._held.pop(k, None)
                self._last_activity = time.time()

        def produce():
            try:
                while not producer_stop.is_set():
                    received = self.pull(producer_stop)
                    if not received:
                        q_put(None)
                        continue
                    if self.counts.first_message is None:
                        self.counts.first_message = time.monotonic()
                    k = hold([rm.ack_id for rm in received])
                    b = self.prepare(received)
                    b.hold_key = k
                    if not q_put(b):
                        self.nack(b.ack_ids)
                        release(k)
                        return
            except BaseException as e:  # noqa: BLE001 - reported by the main loop
                errors.append(e)
                q.put(None)

        def q_put(item) -> bool:
            while True:  # hand over, but keep an eye on the stop flag
                try:
                    q.put(item, timeout=0.2)
                    return True
                except queue.Full:
                    if producer_stop.is_set():
                        return False

        def extender():
            while not producer_stop.wait(ACK_EXTEND_EVERY):
                self._extend_leases()

        t = threading.Thread(target=produce, name="value-added-pull", daemon=True)
        t.start()
        te = threading.Thread(target=extender, name="value-added-lease", daemon=True)
        te.start()
        status = procstatus.StatusWriter(JOB, self.status, status_file).start()
        last_log = time.monotonic()
        last_data = time.monotonic()
        backoff = 1.0
        try:
            while not stop.is_set():
                if errors:
                    raise errors[0]
                try:
                    b = q.get(timeout=0.5)
                except queue.Empty:
                    b = None
                now = time.monotonic()
                if b is not None:
                    try:
                        self.write(b)
                        backoff = 1.0
                    except Exception as e:  # noqa: BLE001 - a service is down: redeliver later
                        self.counts.failed_batches += 1
                        log.error("batch of %d not written (%s: %s); it will be redelivered", b.n_in,
                                  type(e).__name__, " ".join(str(e).split())[:300])
                        self.nack(b.ack_ids)
                        if not self.refresh_storage():
                            stop.wait(backoff)
                        backoff = min(backoff * 2, 30.0)
                    finally:
                        release(b.hold_key)
                    last_data = time.monotonic()
                elif (exit_when_idle is not None and now - last_data > exit_when_idle
                      and not self._holding()):  # idle: nothing pulled, nothing in preparation
                    log.info("value-added: idle for %.0f s, stopping", exit_when_idle)
                    break
                if max_messages is not None and self.counts.messages >= max_messages:
                    break
                if now - last_log >= log_every:
                    print(f"value-added: {self.counts.line()}", file=sys.stderr, flush=True)
                    last_log = now
        finally:
            producer_stop.set()
            # a batch pulled but not written goes back to the subscription
            self._drain_and_nack(q)
            t.join(timeout=120)
            self._drain_and_nack(q)
            with self._held_lock:
                leftover = [a for ids in self._held.values() for a in ids]
                self._held.clear()
            if leftover:
                self.nack(leftover)
            te.join(timeout=5)
            self.dead_letters.teardown()
            if self._store is not None:
                self._store.close()
                self._store = None
            self.close()
            status.stop()
        return self.counts.as_dict()

    def _drain_and_nack(self, q: queue.Queue) -> None:
        try:
            while True:
                b = q.get_nowait()
                if b:
                    self.nack(b.ack_ids)
                    with self._held_lock:
                        self._held.pop(b.hold_key, None)
        except queue.Empty:
            pass


# =============================================================================================
# entry point
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbctl.localrun_value_added", description=__doc__.splitlines()[0])
    p.add_argument("--survey", required=True)
    p.add_argument("--testid", default=None)
    p.add_argument("--project", default=None, help="default: the local services' project")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="stop after no message arrived for this long (default: run until SIGTERM)")
    p.add_argument("--batch", type=int, default=200, help="messages per micro-batch")
    p.add_argument("--workers", type=int, default=1,
                   help="processes running the DoFns (fits and plots are CPU-bound; default 1)")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between count lines on stderr")
    p.add_argument("--max-messages", type=int, default=None, help="stop after this many messages")
    p.add_argument("--dedup-minutes", type=float, default=10.0,
                   help="drop a 2nd alert with the same source id within this window")
    p.add_argument("--science-config", default=None, metavar="YAML",
                   help="filter/SALT2 settings overriding the shipped defaults")
    p.add_argument("--sncosmo-data", default=None, metavar="DIR",
                   help="SALT2 model files (default $SNCOSMO_DATA_DIR, else <shared data>/sncosmo)")
    p.add_argument("--no-plots", action="store_true", help="skip the light-curve PNGs")
    p.add_argument("--home", default=None, help="local state dir (default $PGBCTL_HOME)")
    p.add_argument("--status-file", default=None,
                   help="see pgbctl.procstatus (default $PGBCTL_STATUS_FILE; none: not written)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("apache_beam", "google", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pgbctl.local import services
    from pgbctl.science.sncosmo_data import ModelDataError

    if args.home:
        os.environ["PGBCTL_HOME"] = args.home
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("value-added: signal %d, finishing the batch in hand", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    summary: dict[str, Any] = {"job": JOB, "mode": "fast"}
    rc = 0
    try:
        endpoints = services.endpoints(args.home, project=args.project)
        inst = naming.Instance(args.survey, args.testid, args.project or endpoints.project)
        summary["instance"] = inst.label
        va = _beam_jobs()
        cfg = va.load_science_config(args.science_config, inst.survey)
        model_data = args.sncosmo_data or va.default_model_data("local", inst)
        va.check_model_data(model_data, inst.survey, cfg)  # one clear message, before any I/O
        from pgbctl.clients import Clients

        with Clients.for_backend("local", inst.project, endpoints) as clients:
            ex = ValueAddedExecutor(inst, clients, cfg=cfg, model_data=model_data, batch=args.batch,
                                    workers=args.workers, plots=not args.no_plots,
                                    dedup_minutes=args.dedup_minutes)
            summary["workers"] = args.workers
            summary.update(ex.run(stop, exit_when_idle=args.exit_when_idle, log_every=args.log_every,
                                  max_messages=args.max_messages, status_file=args.status_file))
    except ModelDataError as e:
        print(f"value-added: cannot start: {e}", file=sys.stderr, flush=True)
        summary["error"] = f"ModelDataError: {' '.join(str(e).split())[:500]}"
        rc = 2
    except Exception as e:  # noqa: BLE001
        log.exception("value-added failed")
        summary["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        rc = 1
    summary["wall_seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(summary), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
