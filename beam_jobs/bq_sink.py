"""bq-sink: alerts from Pub/Sub into the warehouse tables ``alerts`` and ``DIASource``.

Pipeline (``run`` alone does I/O; everything between is pure DoFns and composites)::

    ReadFromPubSub(subscription <survey>-alerts-bq-sink[-<testid>], with_attributes=True)
      | AlertsToRows(survey, schemas)                      # composite, no I/O
      |   Decode      DecodeAlert: bytes -> alert dict      (bad packet -> dead_letter)
      |   MakeRows    MakeRows: alert -> both rows, each validated against its table schema
      |               (REQUIRED present, types, NaN/inf -> null; a bad row -> the whole packet
      |               to dead_letter with the reason, so the two tables stay consistent)
      |   Dedup       DedupBySourceId: DeduplicatePerKey on the source id (candid for ZTF),
      |               processing-time window (default 10 min)
      |   Split       one output per table
      +-> alerts     -> WriteToBigQuery(streaming inserts, CREATE_NEVER)  --failed rows--+
      +-> DIASource  -> WriteToBigQuery(streaming inserts, CREATE_NEVER)  --failed rows--+
      +-> dead_letter ----------------------------------------------------------------- Flatten
                                                                 -> WriteDeadLetters (bucket + topic)

Exactly-once rows on Dataflow: Pub/Sub redeliveries of a message are dropped by Dataflow's
Pub/Sub source (message id); the same alert published twice is dropped by the stateful
dedup on the source id within ``--dedup-minutes``; WriteToBigQuery commits its own
insert ids before inserting, so its retries do not duplicate rows. (WriteToBigQuery does not
let a pipeline choose insert ids, so they cannot be derived from candid here; the local
executor, which inserts itself, uses the candid as insert id.)

Locally, ``python -m pgbctl.localrun bq-sink`` drives the same DoFns (fast mode) or runs this
pipeline on the DirectRunner (``--mode direct``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics
from apache_beam.transforms.deduplicate import DeduplicatePerKey
from apache_beam.utils.timestamp import Duration

from beam_jobs.common import (
    DEAD_LETTER,
    DecodeAlert,
    Decoded,
    EmulatorBigQueryClient,
    WriteDeadLetters,
    compile_schema,
    dead_letter,
    failed_row_dead_letter,
    pipeline_options,
    validate_row,
)
from pgbctl import naming, rows

log = logging.getLogger(__name__)

JOB = "bq-sink"
STAGE = "bq-sink"
TABLES: tuple[str, ...] = ("alerts", "DIASource")
DEFAULT_DEDUP_MINUTES = 10.0
INSERT_BATCH_SIZE = 500


def table_schemas(survey: str) -> dict[str, list[dict]]:
    """The BigQuery schemas (API representation) of the tables this job writes."""
    from pgbctl.backends.bqschema import load_template

    return {t: load_template(survey, t) for t in TABLES}


def source_id_column(smap, schema: list[dict]) -> str:
    """The column holding the alert's source id in a table: a top-level column named like the
    map's ``sourceId`` (ZTF ``candid``) if the table has one, else ``<source>.<sourceId>``."""
    sid = smap["sourceId"]
    if any(f["name"] == sid for f in schema):
        return sid
    return f"{smap['source']}.{sid}"


# =============================================================================================
# DoFns
# =============================================================================================


class MakeRows(beam.DoFn):
    """:class:`~beam_jobs.common.Decoded` -> ``(source_id, {table: row})`` with every row
    validated against its table schema; an alert whose rows cannot be made or are invalid
    goes to the ``dead_letter`` output as a packet (raw bytes + one-line reason)."""

    def __init__(self, survey: str, schemas: dict[str, list[dict]], stage: str = STAGE):
        self.survey = survey
        self.schemas = schemas
        self.stage = stage
        self.invalid = Metrics.counter(stage, "invalid_rows")
        self.unknown_fields = Metrics.counter(stage, "unknown_fields_dropped")

    def setup(self):
        from pgbctl import schemamap

        self.smap = schemamap.load(self.survey)
        self._compiled = {t: compile_schema(s) for t, s in self.schemas.items()}
        self._makers = {"alerts": rows.alerts_row, "DIASource": rows.diasource_row}
        self._warned: set[str] = set()

    def process(self, d: Decoded):
        try:
            out = {}
            for table, schema in self._compiled.items():
                row, unknown = validate_row(self._makers[table](d.alert, self.smap), schema, table)
                if unknown:
                    self.unknown_fields.inc(len(unknown))
                    new = set(unknown) - self._warned
                    if new:
                        self._warned |= new
                        log.warning("%s: fields not in table %s dropped: %s", self.stage, table,
                                    ", ".join(sorted(new)[:20]))
                out[table] = row
            source_id = int(rows.source_id(d.alert, self.smap))
        except (rows.RowError, TypeError, ValueError, KeyError) as e:
            self.invalid.inc()
            reason = str(e) if isinstance(e, rows.RowError) else f"cannot make rows: {type(e).__name__}: {e}"
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(self.stage, reason, message_id=d.message_id,
                                                               attributes=d.attributes, data=d.data))
            return
        yield source_id, out


class SplitTables(beam.DoFn):
    """``(source_id, {table: row})`` -> the row on the output named after its table."""

    def __init__(self, tables: tuple[str, ...] = TABLES, stage: str = STAGE):
        self.tables = tables
        self.counters = {t: Metrics.counter(stage, f"rows_{t}") for t in tables}

    def process(self, kv):
        _, by_table = kv
        for t in self.tables:
            self.counters[t].inc()
            yield pvalue.TaggedOutput(t, by_table[t])


def _identity(x):
    return x


# =============================================================================================
# composite transforms
# =============================================================================================


class DedupBySourceId(beam.PTransform):
    """Drop a second ``(source_id, rows)`` with the same source id seen within
    ``minutes`` of processing time (stateful: per-key state + a processing-time timer)."""

    def __init__(self, minutes: float = DEFAULT_DEDUP_MINUTES):
        super().__init__()
        self.minutes = minutes

    def expand(self, keyed):
        # an int key gets a deterministic coder (VarInt), which keyed state requires
        typed = keyed | "TypeKeys" >> beam.Map(_identity).with_output_types(Tuple[int, Dict[str, Any]])
        return typed | "DeduplicatePerKey" >> DeduplicatePerKey(
            processing_time_duration=Duration(seconds=int(self.minutes * 60)))


class AlertsToRows(beam.PTransform):
    """Pub/Sub messages -> ``{"alerts": rows, "DIASource": rows, "dead_letter": dead letters}``."""

    def __init__(self, survey: str, schemas: dict[str, list[dict]], dedup_minutes: float = DEFAULT_DEDUP_MINUTES,
                 stage: str = STAGE):
        super().__init__()
        self.survey = survey
        self.schemas = schemas
        self.dedup_minutes = dedup_minutes
        self.stage = stage

    def expand(self, messages):
        decoded = messages | "Decode" >> beam.ParDo(DecodeAlert(self.survey, self.stage)).with_outputs(
            DEAD_LETTER, main="alerts")
        made = decoded.alerts | "MakeRows" >> beam.ParDo(MakeRows(self.survey, self.schemas, self.stage)).with_outputs(
            DEAD_LETTER, main="rows")
        unique = made.rows | "Dedup" >> DedupBySourceId(self.dedup_minutes)
        split = unique | "Split" >> beam.ParDo(SplitTables(tuple(self.schemas), self.stage)).with_outputs(
            *self.schemas)
        dead = (decoded[DEAD_LETTER], made[DEAD_LETTER]) | "FlattenDeadLetters" >> beam.Flatten()
        return {**{t: split[t] for t in self.schemas}, DEAD_LETTER: dead}


# =============================================================================================
# run: the only place with I/O
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m beam_jobs.bq_sink", description=__doc__.splitlines()[0])
    p.add_argument("--survey", required=True)
    p.add_argument("--testid", default=None, help="omit for production")
    p.add_argument("--project", required=True, dest="gcp_project")
    p.add_argument("--backend", choices=("gcp", "local"), default="gcp")
    p.add_argument("--region", default="us-central1")
    p.add_argument("--max-num-workers", type=int, default=2)
    p.add_argument("--machine-type", default=None)
    p.add_argument("--dedup-minutes", type=float, default=DEFAULT_DEDUP_MINUTES)
    p.add_argument("--home", default=None, help="local backend state dir (default $PGBCTL_HOME)")
    return p


def write_kwargs(inst: naming.Instance, table: str, schema: list[dict], backend: str, endpoints: Any = None) -> dict:
    """Keyword arguments of ``WriteToBigQuery`` for ``table``."""
    from apache_beam.io.gcp.bigquery_tools import RetryStrategy

    kw = dict(
        table=f"{inst.project}:{inst.dataset}.{table}",
        schema={"fields": schema},
        method=beam.io.WriteToBigQuery.Method.STREAMING_INSERTS,
        create_disposition=beam.io.BigQueryDisposition.CREATE_NEVER,
        write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
        insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
        batch_size=INSERT_BATCH_SIZE,
    )
    if backend == "gcp":
        kw["with_auto_sharding"] = True
    else:
        kw["test_client"] = EmulatorBigQueryClient(inst.project, endpoints.bigquery_url)
    return kw


def build(p: beam.Pipeline, inst: naming.Instance, backend: str, *, endpoints: Any = None,
          dedup_minutes: float = DEFAULT_DEDUP_MINUTES, schemas: dict[str, list[dict]] | None = None) -> None:
    """Add the whole job to pipeline ``p``."""
    from pgbctl import schemamap

    schemas = schemas or table_schemas(inst.survey)
    smap = schemamap.load(inst.survey)
    subscription = f"projects/{inst.project}/subscriptions/{inst.subscription('alerts-bq-sink')}"
    messages = p | "Read" >> beam.io.ReadFromPubSub(subscription=subscription, with_attributes=True)
    out = messages | "AlertsToRows" >> AlertsToRows(inst.survey, schemas, dedup_minutes)
    dead = [out[DEAD_LETTER]]
    for t, schema in schemas.items():
        result = out[t] | f"Write_{t}" >> beam.io.WriteToBigQuery(**write_kwargs(inst, t, schema, backend, endpoints))
        sid = source_id_column(smap, schema)
        dead.append(result.failed_rows_with_errors
                    | f"FailedRows_{t}" >> beam.Map(failed_row_dead_letter, STAGE, sid if "." not in sid else None))
    (tuple(dead) | "AllDeadLetters" >> beam.Flatten()
     | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(inst, backend, endpoints)))


def run(argv: list[str] | None = None, *, wait: bool | None = None):
    """Build the options, the pipeline, and run it. Returns the PipelineResult.

    ``wait``: block until the pipeline ends (default: locally yes, on Dataflow no -- a
    streaming job runs until drained/cancelled; the launcher returns once it is submitted).
    """
    args, beam_args = build_parser().parse_known_args(argv)
    inst = naming.Instance(args.survey, args.testid, args.gcp_project)
    endpoints = None
    if args.backend == "local":
        import os

        from pgbctl.local import services

        endpoints = services.endpoints(args.home, project=inst.project)
        # ReadFromPubSub on the DirectRunner builds its own SubscriberClient: the emulator env
        os.environ.update(endpoints.env(inst.project))
    options = pipeline_options(JOB, inst, args.backend, region=args.region, max_num_workers=args.max_num_workers,
                               machine_type=args.machine_type, extra=beam_args)
    p = beam.Pipeline(options=options)
    build(p, inst, args.backend, endpoints=endpoints, dedup_minutes=args.dedup_minutes)
    result = p.run()
    if wait if wait is not None else args.backend == "local":
        result.wait_until_finish()
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run()
