"""Run a Beam job of an instance locally, on the emulators.

    python -m pgbctl.localrun bq-sink --survey ztf --testid x --project P [--mode fast|direct]

Modes
-----
``fast`` (default): a long-running micro-batch executor. One thread pulls what is waiting in
the job's subscription and runs it through the job's DoFns in-process
(``DoFn.setup/process``: :class:`beam_jobs.common.DecodeAlert`,
:class:`beam_jobs.bq_sink.MakeRows` -- the same code Dataflow runs), merging the result into
one pending batch; the main thread takes the whole pending batch whenever it is free and
writes it: it drops duplicates (in the batch, and source ids already in each table -- one
warehouse query per batch), appends each table's rows (a Parquet load job, or streaming
inserts with insert ids = source ids), writes dead letters
(:class:`beam_jobs.common.WriteDeadLetters`), and only then acknowledges the batch
(at-least-once delivery + dedup against the tables = each alert's rows exactly once, across
restarts too). A warehouse error leaves the batch unacknowledged (redelivered later).
Batches grow with the backlog up to ``--batch`` (the warehouse's cost per row halves from
~250 to 1000 rows per batch); at low rates a message waits about one write (~0.3 s).

``direct``: the job's Beam pipeline (:func:`beam_jobs.bq_sink.run`) on the streaming
bundle-based DirectRunner -- the exact Dataflow graph, slow (its Pub/Sub source pulls 10
messages per bundle and acknowledges them before processing: at-most-once if it dies).

Both stop cleanly on SIGTERM/SIGINT: ``fast`` finishes and acknowledges the batch it is
writing and hands back (nacks) what was pulled but not yet written; ``direct`` cancels the
pipeline. Counts are logged to stderr every ``--log-every`` seconds and a final JSON summary
line is printed on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from pgbctl import naming
from pgbctl.clients import ack_all, nack_all

log = logging.getLogger("pgbctl.localrun")
# the emulator needs return_immediately (see pull_batch); the client warns on every pull
warnings.filterwarnings("ignore", message="The return_immediately flag is deprecated", category=DeprecationWarning)

JOBS = ("bq-sink",)


# =============================================================================================
# DoFn driving
# =============================================================================================


def run_dofn(fn, elements, main: str = "main") -> dict[str, list]:
    """Run a DoFn's ``process`` over ``elements`` in-process; outputs by tag (``main`` for
    untagged). The caller does ``setup()``/``teardown()``."""
    from apache_beam import pvalue

    out: dict[str, list] = {main: []}
    for e in elements:
        for o in fn.process(e) or ():
            if isinstance(o, pvalue.TaggedOutput):
                out.setdefault(o.tag, []).append(o.value)
            else:
                out[main].append(o)
    return out


def pull_batch(subscriber, subscription: str, batch: int, stop: threading.Event | None = None,
               max_wait: float = 0.5, poll: float = 0.05) -> list:
    """Up to ``batch`` ReceivedMessages from ``subscription`` (local emulator), pulling with
    ``return_immediately``: returns once a pull comes back empty after something was
    received, when ``batch`` is reached, or with ``[]`` after ``max_wait`` seconds."""
    got: list = []
    deadline = time.monotonic() + max_wait
    while len(got) < batch and not (stop is not None and stop.is_set()):
        resp = subscriber.pull(request={"subscription": subscription, "max_messages": min(1000, batch - len(got)),
                                        "return_immediately": True}, timeout=30)
        got.extend(resp.received_messages)
        if got and (not resp.received_messages or time.monotonic() >= deadline):
            break
        if not resp.received_messages:
            if time.monotonic() >= deadline:
                break
            if stop is not None:
                stop.wait(poll)
            else:
                time.sleep(poll)
    return got


_ARROW_TYPES = {"INTEGER": "int64", "INT64": "int64", "FLOAT": "float64", "FLOAT64": "float64",
                "STRING": "string", "BOOLEAN": "bool_", "BOOL": "bool_", "BYTES": "string"}


def arrow_schema(fields: list[dict]):
    """The Arrow schema of a BigQuery table schema (API representation) for Parquet loads.
    BYTES columns carry base64 text (what the rows hold), as BigQuery's JSON does."""
    import pyarrow as pa

    def one(f: dict):
        t = (f.get("type") or "STRING").upper()
        if t in ("RECORD", "STRUCT"):
            typ = pa.struct([one(s) for s in f.get("fields") or ()])
        elif t in _ARROW_TYPES:
            typ = getattr(pa, _ARROW_TYPES[t])()
        else:
            raise ValueError(f"column {f['name']!r}: type {t} cannot be loaded from Parquet here")
        mode = (f.get("mode") or "NULLABLE").upper()
        if mode == "REPEATED":
            typ = pa.list_(typ)
        return pa.field(f["name"], typ, nullable=mode != "REQUIRED")

    return pa.schema([one(f) for f in fields])


@dataclass
class BatchCounts:
    """What every micro-batch executor counts; subclasses add their outputs."""

    messages: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    batches: int = 0
    failed_batches: int = 0
    started: float = field(default_factory=time.monotonic)
    first_message: float | None = None
    last_write: float | None = None

    def common(self) -> dict[str, Any]:
        """The shared counters and rates (``in`` goes first in each executor's dict)."""
        busy = (self.last_write - self.first_message) if (self.first_message and self.last_write) else 0.0
        return {
            "duplicates": self.duplicates,
            "dead_letters": self.dead_letters,
            "batches": self.batches,
            "failed_batches": self.failed_batches,
            "seconds": round(time.monotonic() - self.started, 2),
            "busy_seconds": round(busy, 2),
            "alerts_per_s": round(self.messages / busy, 1) if busy > 0 else None,
        }


@dataclass
class Counts(BatchCounts):
    rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"in": self.messages, **{f"rows_{t}": n for t, n in self.rows.items()}, **self.common()}

    def line(self) -> str:
        d = self.as_dict()
        rows = " ".join(f"{k}={v}" for k, v in d.items() if k.startswith("rows_"))
        rate = f" {d['alerts_per_s']}/s" if d["alerts_per_s"] else ""
        return (f"in={d['in']} {rows} dup={d['duplicates']} dead_letters={d['dead_letters']} "
                f"batches={d['batches']}{rate}")


# =============================================================================================
# fast mode: bq-sink
# =============================================================================================


@dataclass
class Prepared:
    """One pulled batch after the DoFns ran: rows by source id, dead letters, ack ids."""

    ack_ids: list[str]
    rows: dict[int, dict[str, dict]]  # source id -> {table: row}
    dead: list[dict]
    n_in: int
    in_batch_duplicates: int = 0

    def merge(self, other: "Prepared") -> "Prepared":
        """This batch and ``other`` as one (a source id in both counts as an in-batch duplicate)."""
        dups = sum(1 for sid in other.rows if sid in self.rows)
        rows = {**other.rows, **self.rows}  # the first seen wins, as within one batch
        return Prepared(self.ack_ids + other.ack_ids, rows, self.dead + other.dead, self.n_in + other.n_in,
                        self.in_batch_duplicates + other.in_batch_duplicates + dups)


class BqSinkExecutor:
    """The fast local executor of bq-sink (see the module docstring)."""

    METHODS = ("load", "insert")
    #: google-cloud-bigquery switches to resumable uploads above 5 MB, which the local
    #: warehouse does not implement: Parquet files stay below this
    MAX_LOAD_BYTES = 4_500_000

    def __init__(self, inst: naming.Instance, clients, *, batch: int = 1000, max_wait: float = 0.5,
                 insert_chunk: int = 1000, method: str = "load"):
        from beam_jobs import bq_sink
        from beam_jobs.common import DecodeAlert, WriteDeadLetters
        from pgbctl import schemamap

        if method not in self.METHODS:
            raise ValueError(f"unknown write method {method!r}; choose from {self.METHODS}")
        self.inst = inst
        self.clients = clients
        self.method = method
        self.batch = batch
        self.max_wait = max_wait
        self.insert_chunk = insert_chunk
        self.smap = schemamap.load(inst.survey)
        self.schemas = self.live_schemas(bq_sink.table_schemas(inst.survey))
        self.arrow = {t: arrow_schema(s) for t, s in self.schemas.items()} if method == "load" else {}
        self.tables = tuple(self.schemas)
        self.sid_column = {t: bq_sink.source_id_column(self.smap, s) for t, s in self.schemas.items()}
        self.subscription = clients.subscription_path(inst.subscription("alerts-bq-sink"))
        self.decode = DecodeAlert(inst.survey, bq_sink.STAGE)
        self.make_rows = bq_sink.MakeRows(inst.survey, self.schemas, bq_sink.STAGE)
        self.dead_letters = WriteDeadLetters(inst, clients.backend, clients=clients)
        for fn in (self.decode, self.make_rows, self.dead_letters):
            fn.setup()
        self.counts = Counts(rows={t: 0 for t in self.tables})
        self._flow_lock = threading.Lock()
        self._in_flight = 0  # pulled, not yet acked or handed back
        self._last_activity = time.time()

    def live_schemas(self, templates: dict[str, list[dict]]) -> dict[str, list[dict]]:
        """The tables' schemas as the warehouse has them (rows are validated against what
        will receive them); a missing table is an error (``pgbctl create`` makes them)."""
        from google.api_core import exceptions as gexc

        out = {}
        for t in templates:
            try:
                table = self.clients.bigquery.get_table(self.inst.table(t))
            except gexc.NotFound:
                raise RuntimeError(f"table {self.inst.table(t)} does not exist: run `pgbctl create` for "
                                   f"{self.inst.label} first") from None
            out[t] = [f.to_api_repr() for f in table.schema]
        return out

    # ---- pull + DoFns (producer thread) -------------------------------------------------------

    def pull(self, stop: threading.Event) -> list:
        """Up to ``batch`` received messages; returns as soon as the subscription runs dry
        after something was received, or with nothing after ``max_wait`` seconds.

        Every pull uses ``return_immediately``: the emulator otherwise holds an empty pull for
        ~30 s, and a pull abandoned on a client deadline can still lease messages that then
        stay invisible for a whole ack deadline."""
        return pull_batch(self.clients.subscriber, self.subscription, self.batch, stop, self.max_wait)

    def prepare(self, received: list) -> Prepared:
        from apache_beam.io.gcp.pubsub import PubsubMessage

        from beam_jobs.common import DEAD_LETTER

        msgs = []
        for rm in received:
            m = rm.message
            msgs.append(PubsubMessage(m.data, dict(m.attributes), message_id=m.message_id,
                                      publish_time=m.publish_time))
        dec = run_dofn(self.decode, msgs)
        made = run_dofn(self.make_rows, dec["main"])
        by_id: dict[int, dict] = {}
        dups = 0
        for sid, rows in made["main"]:
            if sid in by_id:
                dups += 1
                continue
            by_id[sid] = rows
        dead = dec.get(DEAD_LETTER, []) + made.get(DEAD_LETTER, [])
        return Prepared([rm.ack_id for rm in received], by_id, dead, len(received), dups)

    # ---- warehouse (main thread) --------------------------------------------------------------

    def existing(self, ids: list[int], tables: tuple[str, ...] | None = None) -> dict[str, set[int]]:
        """Source ids among ``ids`` already present, per table (one query)."""
        from google.cloud import bigquery

        tables = tables or self.tables
        out: dict[str, set[int]] = {t: set() for t in tables}
        if not ids:
            return out
        parts = [f"SELECT '{t}' AS t, {self.sid_column[t]} AS sid FROM `{self.inst.table(t)}` "
                 f"WHERE {self.sid_column[t]} IN UNNEST(@ids)" for t in tables]
        cfg = bigquery.QueryJobConfig(query_parameters=[bigquery.ArrayQueryParameter("ids", "INT64", ids)])
        for r in self.clients.bigquery.query(" UNION ALL ".join(parts), job_config=cfg).result(timeout=120):
            out[r["t"]].add(int(r["sid"]))
        return out

    def insert(self, table: str, items: list[tuple[int, dict]]) -> list[tuple[int, dict, str]]:
        """Insert rows; returns the rows the warehouse refused, with the reason.

        Rows were validated already, so the fast path sends them without
        ``skipInvalidRows`` (the local warehouse converts each row twice with it). If that
        request fails -- the local warehouse answers HTTP 500 for a whole request with one
        bad row -- the rows not yet present are sent again with ``skipInvalidRows`` to get
        per-row errors. Anything else raises (the batch stays unacknowledged).
        """
        from google.api_core import exceptions as gexc
        from google.api_core.retry import Retry

        bq = self.clients.bigquery
        ref = self.inst.table(table)
        failed: list[tuple[int, dict, str]] = []
        for i in range(0, len(items), self.insert_chunk):
            chunk = items[i : i + self.insert_chunk]
            ids = [str(s) for s, _ in chunk]
            try:
                errors = bq.insert_rows_json(ref, [r for _, r in chunk], row_ids=ids, retry=None, timeout=300)
            except (gexc.InternalServerError, gexc.BadRequest, gexc.ServiceUnavailable) as e:
                log.warning("%s: insert of %d rows failed (%s); retrying row by row verdicts", table, len(chunk),
                            " ".join(str(e).split())[:200])
                present = self.existing([s for s, _ in chunk], (table,))[table]
                chunk = [(s, r) for s, r in chunk if s not in present]
                errors = bq.insert_rows_json(ref, [r for _, r in chunk], row_ids=[str(s) for s, _ in chunk],
                                             skip_invalid_rows=True, retry=Retry(timeout=120), timeout=300)
            if errors:
                # real BigQuery without skipInvalidRows refuses the whole request: rows marked
                # "stopped" are fine, send them again
                bad = {e["index"]: e for e in errors if any(x.get("reason") != "stopped" for x in e.get("errors", []))}
                stopped = [chunk[e["index"]] for e in errors if e["index"] not in bad]
                for idx, e in bad.items():
                    sid, row = chunk[idx]
                    msg = "; ".join(" ".join(str(x.get(k)) for k in ("reason", "location", "message") if x.get(k))
                                    for x in e.get("errors", [])[:3])
                    failed.append((sid, row, f"{table}: warehouse refused the row: {msg}"))
                if stopped:
                    failed += self.insert(table, stopped)
        return failed

    def load(self, table: str, items: list[tuple[int, dict]]) -> None:
        """Append rows with Parquet load jobs (all rows of a job or none). Raises on failure."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq
        from google.cloud import bigquery

        if not items:
            return
        tbl = pa.Table.from_pylist([r for _, r in items], schema=self.arrow[table])
        buf = io.BytesIO()
        pq.write_table(tbl, buf, compression="snappy")
        if buf.tell() > self.MAX_LOAD_BYTES and len(items) > 1:
            half = len(items) // 2
            self.load(table, items[:half])
            self.load(table, items[half:])
            return
        buf.seek(0)
        cfg = bigquery.LoadJobConfig(source_format=bigquery.SourceFormat.PARQUET,
                                     write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
                                     create_disposition=bigquery.CreateDisposition.CREATE_NEVER)
        # (no size=: with it google-cloud-bigquery sends the file part as */*, which the
        # local warehouse refuses)
        job = self.clients.bigquery.load_table_from_file(buf, self.inst.table(table), job_config=cfg)
        job.result(timeout=300)

    def write_table(self, table: str, items: list[tuple[int, dict]]) -> list[tuple[int, dict, str]]:
        """Write rows to one table with the configured method; the refused rows with reasons."""
        if self.method == "load" and items:
            try:
                self.load(table, items)
                return []
            except Exception as e:  # noqa: BLE001 - the row-by-row verdicts come from insertAll
                log.warning("%s: load of %d rows failed (%s: %s); inserting them instead", table, len(items),
                            type(e).__name__, " ".join(str(e).split())[:200])
                present = self.existing([s for s, _ in items], (table,))[table]
                items = [(s, r) for s, r in items if s not in present]
        return self.insert(table, items)

    def write(self, prep: Prepared) -> None:
        """Rows, then dead letters, then the ack. Raises if the batch could not be written."""
        from beam_jobs import bq_sink
        from beam_jobs.common import dead_letter

        dead = list(prep.dead)
        dups = prep.in_batch_duplicates
        inserted = {t: 0 for t in self.tables}
        if prep.rows:
            present = self.existing(list(prep.rows))
            for t in self.tables:
                todo = [(sid, rows[t]) for sid, rows in prep.rows.items() if sid not in present[t]]
                for sid, row, reason in self.write_table(t, todo):
                    attrs = {"table": t, self.smap["sourceId"]: str(sid)}
                    dead.append(dead_letter(bq_sink.STAGE, reason, attributes=attrs, row=row, table=t, key=str(sid)))
                    inserted[t] -= 1
                inserted[t] += len(todo)
            dups += sum(1 for sid in prep.rows if all(sid in present[t] for t in self.tables))
        if dead:
            self.dead_letters.write(dead)
        self.ack(prep.ack_ids)
        c = self.counts
        c.messages += prep.n_in
        c.duplicates += dups
        c.dead_letters += len(dead)
        c.batches += 1
        for t, n in inserted.items():
            c.rows[t] += n
        c.last_write = time.monotonic()

    def ack(self, ack_ids: list[str]) -> None:
        ack_all(self.clients.subscriber, self.subscription, ack_ids)

    def nack(self, ack_ids: list[str]) -> None:
        nack_all(self.clients.subscriber, self.subscription, ack_ids)

    # ---- the loop -----------------------------------------------------------------------------

    def status(self) -> dict:
        """For the status file (:mod:`pgbctl.procstatus`)."""
        with self._flow_lock:
            in_flight, last = self._in_flight, self._last_activity
        return {"in_flight": in_flight, "last_activity": last, "counts": self.counts.as_dict()}

    def _pulled(self, n: int) -> None:
        with self._flow_lock:
            self._in_flight += n
            self._last_activity = time.time()

    def _settled(self, n: int) -> None:
        with self._flow_lock:
            self._in_flight -= n
            self._last_activity = time.time()

    def run(self, stop: threading.Event, *, exit_when_idle: float | None = None, log_every: float = 10.0,
            max_messages: int | None = None, status_file: str | None = None) -> dict:
        """Until ``stop`` (or idle / ``max_messages``): one thread pulls and runs the DoFns,
        merging what it prepares into one pending batch; the main thread takes the whole
        pending batch whenever it is free and writes it (warehouse, dead letters, ack).

        So the writer never waits behind a stale batch (latency ~ one write at low rates) and
        batches grow with the backlog, up to ``batch`` messages (the warehouse's cost per row
        falls with the batch size: one load job and one dedup query per batch). Returns the
        final counts; what was pulled but not written when stopping is handed back (nacked)."""
        from pgbctl import procstatus

        cond = threading.Condition()
        box: dict[str, Prepared | None] = {"pending": None}
        stages_stop = threading.Event()
        errors: list[BaseException] = []

        def pending_n() -> int:
            p = box["pending"]
            return p.n_in if p is not None else 0

        def puller():
            try:
                while not stages_stop.is_set():
                    with cond:
                        while pending_n() >= self.batch and not stages_stop.is_set():
                            cond.wait(0.2)  # the writer is behind: let it catch up
                        room = self.batch - pending_n()
                        waiting = pending_n() > 0
                    if stages_stop.is_set():
                        return
                    got = pull_batch(self.clients.subscriber, self.subscription, room, stages_stop,
                                     0.05 if waiting else self.max_wait)
                    if not got:
                        continue
                    if self.counts.first_message is None:
                        self.counts.first_message = time.monotonic()
                    self._pulled(len(got))
                    prep = self.prepare(got)
                    with cond:
                        p = box["pending"]
                        box["pending"] = prep if p is None else p.merge(prep)
                        cond.notify_all()
            except BaseException as e:  # noqa: BLE001 - reported by the main loop
                errors.append(e)
                with cond:
                    cond.notify_all()

        t = threading.Thread(target=puller, name="bq-sink-pull", daemon=True)
        t.start()
        status = procstatus.StatusWriter("bq-sink", self.status, status_file).start()
        last_log = time.monotonic()
        last_data = time.monotonic()
        backoff = 1.0
        try:
            while not stop.is_set():
                if errors:
                    raise errors[0]
                with cond:
                    if box["pending"] is None:
                        cond.wait(0.2)
                    prep, box["pending"] = box["pending"], None
                    cond.notify_all()
                now = time.monotonic()
                if prep is not None:
                    try:
                        self.write(prep)
                        backoff = 1.0
                    except Exception as e:  # noqa: BLE001 - warehouse/storage down: redeliver later
                        self.counts.failed_batches += 1
                        log.error("batch of %d not written (%s: %s); it will be redelivered", prep.n_in,
                                  type(e).__name__, " ".join(str(e).split())[:300])
                        self.nack(prep.ack_ids)
                        stop.wait(backoff)
                        backoff = min(backoff * 2, 30.0)
                    self._settled(len(prep.ack_ids))
                    last_data = time.monotonic()
                elif exit_when_idle is not None and now - last_data > exit_when_idle and self._in_flight == 0:
                    log.info("bq-sink: idle for %.0f s, stopping", exit_when_idle)
                    break
                if max_messages is not None and self.counts.messages >= max_messages:
                    break
                if now - last_log >= log_every:
                    print(f"bq-sink: {self.counts.line()}", file=sys.stderr, flush=True)
                    last_log = now
        finally:
            stages_stop.set()
            with cond:
                cond.notify_all()
            t.join(timeout=35)
            # pulled and prepared but not written: back to the subscription
            with cond:
                prep, box["pending"] = box["pending"], None
            if prep is not None:
                self.nack(prep.ack_ids)
                self._settled(len(prep.ack_ids))
            self.dead_letters.teardown()
            status.stop()
        return self.counts.as_dict()


# =============================================================================================
# direct mode
# =============================================================================================


def _beam_counters(result) -> dict[str, int]:
    from apache_beam.metrics.metric import MetricsFilter

    out: dict[str, int] = {}
    try:
        res = result.metrics().query(MetricsFilter())
    except Exception:  # noqa: BLE001
        return out
    for c in res.get("counters", []):
        name = c.key.metric.name
        v = c.committed if c.committed is not None else c.attempted
        out[name] = out.get(name, 0) + int(v or 0)
    return out


def run_direct(inst: naming.Instance, stop: threading.Event, *, home: str | None, exit_when_idle: float | None,
               log_every: float, dedup_minutes: float) -> dict:
    from beam_jobs import bq_sink

    argv = ["--survey", inst.survey, "--project", inst.project, "--backend", "local",
            "--dedup-minutes", str(dedup_minutes)]
    if inst.testid:
        argv += ["--testid", inst.testid]
    if home:
        argv += ["--home", home]
    started = time.monotonic()
    result = bq_sink.run(argv, wait=False)
    last, last_change, last_log = -1, time.monotonic(), time.monotonic()
    first = None
    counters: dict[str, int] = {}
    while not stop.wait(1.0):
        counters = _beam_counters(result)
        n = counters.get("messages_in", 0)
        now = time.monotonic()
        if n and first is None:
            first = now
        if n != last:
            last, last_change = n, now
        if now - last_log >= log_every:
            print(f"bq-sink[direct]: {counters}", file=sys.stderr, flush=True)
            last_log = now
        state = str(result.state)
        if "DONE" in state or "FAILED" in state or "CANCELLED" in state:
            break
        if exit_when_idle is not None and now - last_change > exit_when_idle and (n or now - started > 60):
            break
    busy_end = last_change
    counters = _beam_counters(result)
    try:
        result.cancel()
    except Exception as e:  # noqa: BLE001
        log.warning("cancel: %s", e)
    n = counters.get("messages_in", 0)
    busy = (busy_end - first) if first else 0.0
    return {
        "in": n,
        "rows_alerts": counters.get("rows_alerts", 0),
        "rows_DIASource": counters.get("rows_DIASource", 0),
        "dead_letters": counters.get("written", 0),
        "seconds": round(time.monotonic() - started, 2),
        "busy_seconds": round(busy, 2),
        "alerts_per_s": round(n / busy, 1) if busy > 0 else None,
    }


# =============================================================================================
# entry point
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbctl.localrun", description=__doc__.splitlines()[0])
    p.add_argument("job", choices=JOBS)
    p.add_argument("--survey", required=True)
    p.add_argument("--testid", default=None)
    p.add_argument("--project", default=None, help="default: the local services' project")
    p.add_argument("--mode", choices=("fast", "direct"), default="fast")
    p.add_argument("--batch", type=int, default=1000, help="fast mode: at most this many messages per micro-batch "
                   "(batches grow with the backlog: the warehouse's cost per row falls with the batch size)")
    p.add_argument("--write-method", choices=BqSinkExecutor.METHODS, default="load",
                   help="fast mode: Parquet load jobs (default; ~5x faster on the local warehouse) or "
                        "streaming inserts (insertAll, what Dataflow uses)")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between count lines on stderr")
    p.add_argument("--exit-when-idle", type=float, default=None, metavar="SECONDS",
                   help="stop after no message arrived for this long (default: run until SIGTERM)")
    p.add_argument("--max-messages", type=int, default=None, help="fast mode: stop after this many messages")
    p.add_argument("--dedup-minutes", type=float, default=10.0, help="direct mode: dedup window")
    p.add_argument("--home", default=None, help="local state dir (default $PGBCTL_HOME)")
    p.add_argument("--status-file", default=None, help="fast mode: see pgbctl.procstatus (default $PGBCTL_STATUS_FILE)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pgbctl.paths import REPO_ROOT

    if str(REPO_ROOT) not in sys.path:  # beam_jobs is not an installed package
        sys.path.insert(0, str(REPO_ROOT))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("apache_beam", "google", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from pgbctl.local import services

    if args.home:
        os.environ["PGBCTL_HOME"] = args.home
    endpoints = services.endpoints(args.home, project=args.project)
    inst = naming.Instance(args.survey, args.testid, args.project or endpoints.project)

    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("%s: signal %d, finishing the batch in hand", args.job, signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    summary: dict[str, Any] = {"job": args.job, "mode": args.mode, "instance": inst.label}
    rc = 0
    try:
        if args.mode == "fast":
            from pgbctl.clients import Clients

            with Clients.for_backend("local", inst.project, endpoints) as clients:
                ex = BqSinkExecutor(inst, clients, batch=args.batch, method=args.write_method)
                summary["write_method"] = args.write_method
                summary.update(ex.run(stop, exit_when_idle=args.exit_when_idle, log_every=args.log_every,
                                      max_messages=args.max_messages, status_file=args.status_file))
        else:
            summary.update(run_direct(inst, stop, home=args.home, exit_when_idle=args.exit_when_idle,
                                      log_every=args.log_every, dedup_minutes=args.dedup_minutes))
    except Exception as e:  # noqa: BLE001
        log.exception("%s failed", args.job)
        summary["error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:500]}"
        rc = 1
    summary["wall_seconds"] = round(time.monotonic() - t0, 2)
    print(json.dumps(summary), flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
