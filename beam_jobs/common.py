"""What pgbctl's Beam jobs share: decoding with a dead-letter output, row validation, the
dead-letter sink, and pipeline options for ``gcp`` (Dataflow) and ``local`` (DirectRunner).

Elements
--------
* a Pub/Sub message: ``apache_beam.io.gcp.pubsub.PubsubMessage`` (``ReadFromPubSub(...,
  with_attributes=True)``; the local executor builds the same objects from pulled messages);
  plain ``bytes`` are accepted too (tests).
* :class:`Decoded` -- the output of :class:`DecodeAlert`: the alert dict plus the message's
  id, attributes and raw bytes (kept so a later stage can still dead-letter the packet).
* a dead letter: a plain dict made by :func:`dead_letter` (JSON-able except ``data``)::

      {"stage", "reason", "message_id", "attributes", "data": bytes|None,
       "row": dict|None, "table": str|None, "key": str|None}

Dead letters (same layout as the archive function's)
----------------------------------------------------
:class:`WriteDeadLetters` stores each one in the instance's ``dead_letter`` bucket and
publishes a JSON record ``{stage, reason, message_id, object, attributes}`` to the
``dead_letter`` topic (message attributes ``stage`` and ``reason``):

* a packet (``data``): object ``<stage>/<message_id>.avro`` holding the raw bytes, metadata
  ``reason``, ``stage``, ``pubsub.message_id``, ``attr.<name>`` -- exactly what
  :func:`pgbctl.archive.handle` does for stage ``upload_bytes_to_bucket``;
* a warehouse row the warehouse refused after validation (no packet at hand):
  object ``<stage>/<table>/<sourceId>.json`` holding the row as JSON, same metadata plus
  ``table``.

Objects are written with ``if_generation_match=0`` and marked ``announced=true`` once their
record is on the topic: a redelivered dead letter finds its object and is published again
only if the first attempt died before announcing it (:func:`pgbctl.archive.store_dead_letter`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from pgbctl import codec, naming
from pgbctl.rows import RowError

log = logging.getLogger(__name__)

DEAD_LETTER = "dead_letter"
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


def one_line(msg: Any, limit: int = 1000) -> str:
    """A reason as one line of at most ``limit`` characters."""
    s = " ".join(str(msg).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# =============================================================================================
# decoding
# =============================================================================================


class Decoded(NamedTuple):
    """An alert decoded from one Pub/Sub message."""

    alert: dict
    message_id: str
    attributes: dict
    data: bytes


def unpack_message(msg: Any) -> tuple[bytes, dict, str]:
    """``(data, attributes, message_id)`` of a PubsubMessage (or of plain bytes)."""
    if isinstance(msg, (bytes, bytearray, memoryview)):
        return bytes(msg), {}, ""
    data = getattr(msg, "data", None)
    attrs = dict(getattr(msg, "attributes", None) or {})
    mid = getattr(msg, "message_id", None) or ""
    return (bytes(data) if data is not None else b""), attrs, str(mid)


def dead_letter(stage: str, reason: Any, *, message_id: str = "", attributes: dict | None = None,
                data: bytes | None = None, row: dict | None = None, table: str | None = None,
                key: str | None = None) -> dict:
    """A dead letter; ``key`` names a row's object when there is no message id (a source id)."""
    return {
        "stage": stage,
        "reason": one_line(reason) or "unknown error",
        "message_id": message_id or "",
        "attributes": dict(attributes or {}),
        "data": data,
        "row": row,
        "table": table,
        "key": key,
    }


class DecodeAlert(beam.DoFn):
    """Pub/Sub message -> :class:`Decoded`; anything that is not one alert of the survey goes
    to the ``dead_letter`` output with a one-line reason (never raises for bad input).

    A packet is refused when it is not a single-record Avro container
    (:class:`pgbctl.codec.AlertDecodeError`) or when the record has no object id / source id
    (e.g. a valid container of another record type).
    """

    def __init__(self, survey: str, stage: str):
        self.survey = survey
        self.stage = stage
        self.messages = Metrics.counter(stage, "messages_in")
        self.bad = Metrics.counter(stage, "undecodable")

    def setup(self):
        from pgbctl import schemamap

        self.smap = schemamap.load(self.survey)

    def process(self, msg):
        self.messages.inc()
        data, attrs, mid = unpack_message(msg)
        try:
            alert = codec.decode(data)
            object_id, source_id = codec.alert_ids(alert, self.smap)
            if object_id in (None, "") or source_id is None:
                raise codec.AlertDecodeError(
                    f"not a {self.survey} alert: record has no {self.smap['objectId']!r}/"
                    f"{self.smap['sourceId']!r}")
        except Exception as e:  # noqa: BLE001 - every bad packet is dead-lettered, never raised
            reason = str(e) if isinstance(e, codec.AlertDecodeError) else f"{type(e).__name__}: {e}"
            self.bad.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(self.stage, reason, message_id=mid,
                                                               attributes=attrs, data=data))
            return
        yield Decoded(alert, mid, attrs, data)


# =============================================================================================
# rows vs. a BigQuery table schema
# =============================================================================================


class _Field(NamedTuple):
    name: str
    type: str
    mode: str  # NULLABLE | REQUIRED | REPEATED
    fields: "_Schema | None"  # sub-fields of a RECORD


class _Schema(NamedTuple):
    fields: tuple
    names: frozenset


_TYPE_ALIASES = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN", "STRUCT": "RECORD",
                 "NUMERIC": "FLOAT", "BIGNUMERIC": "FLOAT"}
#: (column type, Python type) pairs that need no conversion (floats still need a finiteness check)
_AS_IS = {("FLOAT", float), ("INTEGER", int), ("STRING", str), ("BOOLEAN", bool)}


def compile_schema(fields: Iterable[dict]) -> _Schema:
    """A BigQuery schema (API representation: ``[{name, type, mode, fields}, ...]``) in the
    form :func:`validate_row` walks quickly."""
    if isinstance(fields, _Schema):
        return fields
    out = []
    for f in fields:
        t = (f.get("type") or "STRING").upper()
        t = _TYPE_ALIASES.get(t, t)
        out.append(_Field(f["name"], t, (f.get("mode") or "NULLABLE").upper(),
                          compile_schema(f.get("fields") or ()) if t == "RECORD" else None))
    return _Schema(tuple(out), frozenset(f.name for f in out))


_INT_RX = re.compile(r"^[+-]?\d+$")


def _scalar(v: Any, t: str, path: str) -> Any:
    """The value as the column type takes it (None for NaN/inf), or raise RowError."""
    if t == "FLOAT":
        if isinstance(v, float):
            return float(v) if math.isfinite(v) else None
        if isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                pass
            else:
                return x if math.isfinite(x) else None
    elif t == "INTEGER":
        if isinstance(v, int) and not isinstance(v, bool):
            return int(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                return None
            if v == int(v):
                return int(v)
        if isinstance(v, str) and _INT_RX.match(v):
            return int(v)
    elif t == "STRING":
        if isinstance(v, str):
            return str(v)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return None if isinstance(v, float) and not math.isfinite(v) else str(v)
    elif t == "BOOLEAN":
        if isinstance(v, bool):
            return bool(v)
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
    elif t == "BYTES":
        if isinstance(v, str):
            return v
        if isinstance(v, (bytes, bytearray)):
            return base64.b64encode(bytes(v)).decode()
    else:  # TIMESTAMP, DATE, TIME, DATETIME, GEOGRAPHY, JSON ...: passed through
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return v
    shown = repr(v)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise RowError(f"field {path!r} ({t}) cannot take {type(v).__name__} value {shown}")


def _record(row: Any, schema: _Schema, prefix: str, unknown: list[str]) -> dict:
    if not isinstance(row, dict):
        raise RowError(f"field {prefix.rstrip('.') or '<row>'!r} (RECORD) cannot take {type(row).__name__}")
    out: dict = {}
    isfinite = math.isfinite
    for f in schema.fields:
        v = row.get(f.name)
        if v is None:
            if f.mode == "REQUIRED":
                raise RowError(f"REQUIRED field {prefix + f.name!r} is {'missing' if f.name not in row else 'null'}")
            continue  # a NULLABLE column left out is null (and cheaper to send); REPEATED: empty
        t = f.type
        if f.mode == "REPEATED":
            path = prefix + f.name
            if not isinstance(v, (list, tuple)):
                raise RowError(f"field {path!r} is REPEATED but got {type(v).__name__}")
            items = []
            for i, x in enumerate(v):
                if x is None:
                    raise RowError(f"field {path}[{i}] is null (BigQuery arrays cannot hold nulls)")
                if t == "RECORD":
                    items.append(_record(x, f.fields, f"{path}[{i}].", unknown))
                    continue
                if (t, type(x)) not in _AS_IS or (t == "FLOAT" and not isfinite(x)):
                    x = _scalar(x, t, f"{path}[{i}]")
                    if x is None:
                        raise RowError(f"field {path}[{i}] is NaN/inf (BigQuery arrays cannot hold nulls)")
                items.append(x)
            out[f.name] = items
            continue
        if (t, type(v)) in _AS_IS:
            if t == "FLOAT" and not isfinite(v):
                v = None
        elif t == "RECORD":
            v = _record(v, f.fields, prefix + f.name + ".", unknown)
        else:
            v = _scalar(v, t, prefix + f.name)
        if v is None:
            if f.mode == "REQUIRED":
                raise RowError(f"REQUIRED field {prefix + f.name!r} is NaN/inf")
            continue
        out[f.name] = v
    extra = row.keys() - schema.names
    if extra:
        unknown.extend(prefix + k for k in sorted(extra))
    return out


def validate_row(row: dict, schema: _Schema | list[dict], table: str = "") -> tuple[dict, list[str]]:
    """Check ``row`` against a table schema the way BigQuery's streaming insert would.

    Returns ``(row_to_insert, unknown_fields)``: values converted to the column types
    (NaN/inf -> null, integral floats -> int, ...), null NULLABLE columns left out, fields the
    table does not have dropped (and listed -- the writer never sends them, as
    ``ignore_unknown_values`` would). Raises :class:`pgbctl.rows.RowError` (one line, naming
    the table and the field) for a missing/null REQUIRED field, a value of the wrong type or
    a null inside an array: such a row would be refused by BigQuery, and the local warehouse
    answers a wrong type with HTTP 500 for the whole request.
    """
    compiled = compile_schema(schema)
    unknown: list[str] = []
    try:
        return _record(row, compiled, "", unknown), unknown
    except RowError as e:
        raise RowError(f"{table + ' row: ' if table else ''}{e}") from None


# =============================================================================================
# dead letters
# =============================================================================================


def failed_row_dead_letter(element: tuple, stage: str, source_id_field: str | None = None) -> dict:
    """A dead letter for one element of ``WriteToBigQuery(...).failed_rows_with_errors``:
    ``(destination, row, errors)``."""
    destination, row, errors = element
    table = str(destination).replace(":", ".").rsplit(".", 1)[-1]
    errs = errors if isinstance(errors, list) else [errors]
    parts = []
    for e in errs[:3]:
        if isinstance(e, dict):
            parts.append(" ".join(str(e.get(k)) for k in ("reason", "location", "message") if e.get(k)))
        else:
            parts.append(str(e))
    reason = f"{table}: warehouse refused the row: " + "; ".join(p for p in parts if p)
    attrs = {"table": table}
    key = None
    if source_id_field and isinstance(row, dict) and row.get(source_id_field) is not None:
        key = attrs[source_id_field] = str(row[source_id_field])
    return dead_letter(stage, reason, attributes=attrs, row=row, table=table, key=key)


def dead_letter_object_name(dl: dict) -> str:
    """Object name in the dead-letter bucket (the archive function's scheme for packets)."""
    from pgbctl.archive import dead_letter_name

    stage = dl["stage"]
    if dl.get("data") is not None:
        return dead_letter_name(stage, dl["data"], dl.get("message_id") or "")
    row = dl.get("row") or {}
    blob = json.dumps(row, sort_keys=True, default=str).encode()
    key = dl.get("key") or dl.get("message_id") or hashlib.sha256(blob).hexdigest()[:32]
    return f"{stage}/{_SAFE.sub('_', dl.get('table') or 'row')}/{_SAFE.sub('_', str(key))}.json"


class ClientsDoFn(beam.DoFn):
    """A DoFn that talks to the instance's Pub/Sub / Storage through :class:`pgbctl.clients.Clients`.

    ``clients`` may be given directly when the DoFn is driven in-process (the local
    executors); in a pipeline they are built in :meth:`setup` from ``backend``/``endpoints``
    (never pickled) and closed in :meth:`teardown`.
    """

    def __init__(self, inst: naming.Instance, backend: str, endpoints: Any = None, clients: Any = None):
        self.inst = inst
        self.backend = backend
        self.endpoints = endpoints
        self._clients = clients
        self._own_clients = clients is None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_clients"] = None
        d["_own_clients"] = True
        return d

    def setup(self):
        if self._clients is None:
            from pgbctl.clients import Clients

            self._clients = Clients.for_backend(self.backend, self.inst.project, self.endpoints)
            self._own_clients = True

    def teardown(self):
        if self._own_clients and self._clients is not None:
            self._clients.close()
            self._clients = None


class WriteDeadLetters(ClientsDoFn):
    """Store dead letters in the ``dead_letter`` bucket and announce them on the
    ``dead_letter`` topic (see the module docstring). Storage or Pub/Sub errors raise (the
    bundle is retried); a dead letter already stored is not published again.

    Clients: see :class:`ClientsDoFn`.
    """

    def __init__(self, inst: naming.Instance, backend: str, endpoints: Any = None, clients: Any = None):
        super().__init__(inst, backend, endpoints, clients)
        self.count = Metrics.counter("dead_letters", "written")

    def setup(self):
        super().setup()
        self._bucket = self._clients.storage.bucket(self.inst.bucket("dead_letter"))
        self._topic = self._clients.topic_path(self.inst.topic("dead_letter"))

    def process(self, dl):
        self.write([dl])
        yield dl["reason"]

    def write(self, dls: list[dict]) -> list[str]:
        """Store and publish ``dls``; returns the object names (``bucket/name``).
        (See :func:`pgbctl.archive.store_dead_letter`: exactly once in the bucket, at least
        once on the topic, nothing lost if the process dies in between.)"""
        from pgbctl.archive import dead_letter_record, finish_dead_letters, store_dead_letter

        pending, names = [], []
        for dl in dls:
            name = dead_letter_object_name(dl)
            attrs = dl.get("attributes") or {}
            meta = {"reason": dl["reason"][:1000], "stage": dl["stage"],
                    "pubsub.message_id": dl.get("message_id") or "",
                    **{f"attr.{k}": str(v)[:200] for k, v in attrs.items()}}
            if dl.get("table"):
                meta["table"] = dl["table"]
            if dl.get("data") is not None:
                payload, ctype = dl["data"], "application/octet-stream"
            else:
                payload, ctype = json.dumps(dl.get("row"), default=str).encode(), "application/json"
            full = f"{self._bucket.name}/{name}"
            names.append(full)
            rec = dead_letter_record(dl["stage"], dl["reason"], attrs, dl.get("message_id") or "", full)
            p = store_dead_letter(self._bucket, name, payload, ctype, meta, publisher=self._clients.publisher,
                                  topic=self._topic, record=rec)
            if p is not None:
                pending.append(p)
                log.warning("dead letter %s: %s", full, dl["reason"])
        finish_dead_letters(pending)
        self.count.inc(len(dls))
        return names


# =============================================================================================
# the local warehouse as Beam's BigQuery client
# =============================================================================================


class EmulatorBigQueryClient:
    """A picklable stand-in for ``google.cloud.bigquery.Client`` pointed at the local
    warehouse (``api_endpoint`` = the emulator URL, anonymous credentials), given to
    ``WriteToBigQuery(test_client=...)``.

    Beam's streaming-insert path calls only ``insert_rows_json`` on it
    (``BigQueryWrapper(client=test_client)`` uses the object for both its apitools and its
    google-cloud-bigquery client, and with ``CREATE_NEVER`` the apitools side is never
    touched). Without it Beam builds ``bigquery.Client()`` itself, which honours
    ``BIGQUERY_EMULATOR_HOST`` for the endpoint but insists on Google default credentials.
    Inserts get a bounded retry (``retry_timeout`` s instead of google-cloud-bigquery's
    600 s), and a final server error is re-raised as itself so Beam reports the rows as
    failed instead of crashing on a ``RetryError``.
    """

    def __init__(self, project: str, url: str, retry_timeout: float = 60.0):
        self.project = project
        self.url = url
        self.retry_timeout = retry_timeout
        self._client = None

    def __getstate__(self):
        return {"project": self.project, "url": self.url, "retry_timeout": self.retry_timeout}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import bigquery

            self._client = bigquery.Client(project=self.project, credentials=AnonymousCredentials(),
                                           client_options={"api_endpoint": self.url})
        return self._client

    def insert_rows_json(self, table, json_rows, **kw):
        from google.api_core import exceptions as gexc
        from google.cloud.bigquery import DEFAULT_RETRY

        kw.setdefault("retry", DEFAULT_RETRY.with_timeout(self.retry_timeout))
        try:
            return self.client.insert_rows_json(table, json_rows, **kw)
        except gexc.RetryError as e:
            if isinstance(e.cause, gexc.GoogleAPICallError):
                raise e.cause from None
            raise

    def __getattr__(self, name):
        if name.startswith("_") or name in ("project", "url", "retry_timeout"):
            raise AttributeError(name)
        return getattr(self.client, name)


# =============================================================================================
# pipeline options
# =============================================================================================

#: the runner used locally. Not "DirectRunner": in Beam 2.77 that first tries the Prism runner,
#: which downloads a binary (fails offline); the bundle-based DirectRunner is the one that runs
#: streaming Python pipelines (ReadFromPubSub, state and processing-time timers).
LOCAL_RUNNER = "BundleBasedDirectRunner"
DEFAULT_REGION = "us-central1"


def setup_file() -> Path:
    """What Dataflow workers install (pgbctl and beam_jobs): the repository's pyproject.toml."""
    from pgbctl.paths import REPO_ROOT

    return REPO_ROOT / "pyproject.toml"


def pipeline_args(job: str, inst: naming.Instance, backend: str, *, region: str = DEFAULT_REGION,
                  max_num_workers: int = 2, machine_type: str | None = None, streaming: bool = True,
                  extra: Iterable[str] = ()) -> list[str]:
    """Command-line style Beam options for job ``job`` (a ``naming.BEAM_JOBS`` stub).

    ``gcp``: DataflowRunner, job name from naming, ``gs://<dataflow bucket>/temp`` and
    ``/staging``, autoscaling up to ``max_num_workers``, streaming engine, and
    ``--setup_file <repo>/pyproject.toml`` so workers install pgbctl and beam_jobs.
    ``local``: the bundle-based DirectRunner (see :data:`LOCAL_RUNNER`).
    ``extra`` is appended last (later options win).
    """
    if backend not in ("gcp", "local"):
        raise ValueError(f"unknown backend {backend!r} (choose gcp or local)")
    if max_num_workers < 1:
        raise ValueError("max_num_workers must be >= 1")
    name = inst.beam_job(job)
    args = [f"--project={inst.project}", f"--job_name={name}"]
    if backend == "gcp":
        bucket = inst.bucket("dataflow")
        args = [
            "--runner=DataflowRunner",
            *args,
            f"--region={region}",
            f"--temp_location=gs://{bucket}/temp",
            f"--staging_location=gs://{bucket}/staging",
            f"--max_num_workers={max_num_workers}",
            "--autoscaling_algorithm=THROUGHPUT_BASED",
            f"--setup_file={setup_file()}",
            f"--labels=survey={inst.survey}",
            f"--labels=testid={inst.testid or 'production'}",
        ]
        if machine_type:
            args.append(f"--worker_machine_type={machine_type}")
        if streaming:
            args += ["--streaming", "--enable_streaming_engine"]
    else:
        args = [f"--runner={LOCAL_RUNNER}", *args]
        if streaming:
            args.append("--streaming")
    return args + list(extra)


def pipeline_options(job: str, inst: naming.Instance, backend: str, **kw):
    """:func:`pipeline_args` as ``PipelineOptions``."""
    from apache_beam.options.pipeline_options import PipelineOptions

    return PipelineOptions(pipeline_args(job, inst, backend, **kw))
