"""bq-sink (beam_jobs/bq_sink.py): the composite on TestPipeline + assert_that with real and
synthetic ZTF alerts, the DoFns on their own, the pipeline wiring, and the fast local
executor's write logic (pgbctl/localrun.py) over fake warehouse/Pub/Sub clients."""

from __future__ import annotations

import json
import sys
import threading

import pytest

from pgbctl.paths import REPO_ROOT, shared_data_dir

if str(REPO_ROOT) not in sys.path:  # beam_jobs is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

import apache_beam as beam  # noqa: E402
from apache_beam.io.gcp.pubsub import PubsubMessage  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline as _TestPipeline  # noqa: E402
from apache_beam.testing.util import BeamAssertException, assert_that  # noqa: E402

from beam_jobs import bq_sink  # noqa: E402
from beam_jobs.common import (  # noqa: E402
    DEAD_LETTER,
    LOCAL_RUNNER,
    DecodeAlert,
    compile_schema,
    failed_row_dead_letter,
    pipeline_args,
    validate_row,
)
from pgbctl import codec, localrun, naming, rows, schemamap, synth  # noqa: E402

SMAP = schemamap.load("ztf")
SCHEMAS = bq_sink.table_schemas("ztf")
CUTOUTS = set(SMAP["cutouts"]["fields"])
CORRUPT = ("garbage", "truncate", "wrong_schema")
_SHARED = shared_data_dir()


def _real() -> list[bytes]:
    if _SHARED is None:
        return []
    return [p.read_bytes() for p in sorted((_SHARED / "ztf" / "alerts").glob("*.avro"))]


@pytest.fixture(scope="module")
def packets() -> dict:
    """Real ZTF alerts (when present) + synthetic ones, one duplicate, corrupt packets."""
    good = _real() + synth.generate(20, seed=13, sn_model="bazin")
    bad = [synth.corrupt(good[-1], how, SMAP) for how in CORRUPT]
    candids = {}
    for p in good:
        a = codec.decode(p)
        candids.setdefault(a["candid"], a["objectId"])
    return {"good": good, "bad": bad, "candids": candids,
            "messages": [PubsubMessage(p, {"kafka.topic": "t"}, message_id=f"m{i}")
                         for i, p in enumerate(good + [good[0]] + bad)]}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise BeamAssertException(msg)


def _alerts_rows(want: dict):
    schema = compile_schema(SCHEMAS["alerts"])

    def match(rs):
        got = [r["candid"] for r in rs]
        _check(len(got) == len(set(got)), f"alerts: duplicate rows {len(got) - len(set(got))}")
        _check(set(got) == set(want), f"alerts: {len(set(got))} candids, want {len(want)}")
        for r in rs:
            _check(not CUTOUTS & set(r), "alerts row carries cutouts")
            _check(r["objectId"] == want[r["candid"]], "objectId")
            _check(validate_row(r, schema, "alerts")[0] == r, "row not in its validated form")
            json.dumps(r, allow_nan=False)
    return match


def _diasource_rows(want: dict):
    def match(rs):
        got = [r["candid"] for r in rs]
        _check(sorted(got) == sorted(want), f"DIASource: {len(got)} rows for {len(want)} unique alerts")
        for r in rs:
            _check(not any(isinstance(v, dict) for v in r.values()), "DIASource row is not flat")
            _check(r["objectId"] == want[r["candid"]] and isinstance(r["prv_candids"], list), "ids")
    return match


def _dead(n: int, stage: str = bq_sink.STAGE):
    def match(dls):
        _check(len(dls) == n, f"{len(dls)} dead letters, want {n}")
        for d in dls:
            _check(d["stage"] == stage and d["reason"] and "\n" not in d["reason"], f"reason {d['reason']!r}")
            _check(isinstance(d["data"], bytes) and d["message_id"].startswith("m"), "packet + message id kept")
    return match


def test_alerts_to_rows_on_real_and_synthetic_alerts(packets):
    want = packets["candids"]
    p = _TestPipeline(runner=LOCAL_RUNNER)
    out = p | beam.Create(packets["messages"], reshuffle=False) | bq_sink.AlertsToRows("ztf", SCHEMAS)
    assert_that(out["alerts"], _alerts_rows(want), label="alerts")
    assert_that(out["DIASource"], _diasource_rows(want), label="DIASource")
    assert_that(out[DEAD_LETTER], _dead(len(CORRUPT)), label="dead")
    p.run().wait_until_finish()


def test_rows_the_table_would_refuse_are_dead_lettered_with_the_packet(packets):
    """A row missing a REQUIRED column (here: a stricter copy of the schema) sends the whole
    packet to dead_letter, so the two tables stay consistent."""
    strict = {t: list(s) for t, s in SCHEMAS.items()}
    strict["DIASource"] = strict["DIASource"] + [{"name": "mustHave", "type": "STRING", "mode": "REQUIRED"}]
    msgs = [PubsubMessage(p, {}, message_id=f"m{i}") for i, p in enumerate(packets["good"][:3])]
    p = _TestPipeline(runner=LOCAL_RUNNER)
    out = p | beam.Create(msgs, reshuffle=False) | bq_sink.AlertsToRows("ztf", strict)

    def refused(dls):
        _check(len(dls) == 3, f"{len(dls)} dead letters")
        for d in dls:
            _check("REQUIRED field 'mustHave'" in d["reason"] and "DIASource" in d["reason"], d["reason"])

    assert_that(out[DEAD_LETTER], refused, label="dead")
    assert_that(out["alerts"], lambda rs: _check(not rs, "no row for a refused alert"), label="none")
    p.run().wait_until_finish()


def test_make_rows_dofn(packets):
    dec = DecodeAlert("ztf", bq_sink.STAGE)
    dec.setup()
    mk = bq_sink.MakeRows("ztf", SCHEMAS)
    mk.setup()
    decoded = localrun.run_dofn(dec, [PubsubMessage(packets["good"][0], {"a": "b"}, message_id="x")])
    assert not decoded.get(DEAD_LETTER)
    (sid, by_table), = localrun.run_dofn(mk, decoded["main"])["main"]
    alert = codec.decode(packets["good"][0])
    assert sid == alert["candid"] and set(by_table) == {"alerts", "DIASource"}
    assert by_table["DIASource"]["candid"] == sid and by_table["alerts"]["objectId"] == alert["objectId"]
    # a NaN magnitude becomes null, which the alerts table refuses (candidate.magpsf is
    # REQUIRED there): the packet is dead-lettered with the reason, never half-written
    nan = synth.corrupt(packets["good"][-1], "nan_mag", SMAP)
    out = localrun.run_dofn(mk, localrun.run_dofn(dec, [nan])["main"])
    assert not out["main"]
    (dl,) = out[DEAD_LETTER]
    assert dl["reason"] == "alerts row: REQUIRED field 'candidate.magpsf' is null" and dl["data"] == nan


def test_split_tables():
    out = localrun.run_dofn(bq_sink.SplitTables(), [(1, {"alerts": {"a": 1}, "DIASource": {"d": 1}})])
    assert out == {"main": [], "alerts": [{"a": 1}], "DIASource": [{"d": 1}]}


def test_failed_row_dead_letter():
    dl = failed_row_dead_letter(("p:ds.DIASource", {"candid": 7, "x": 1}, [{"reason": "invalid", "location": "x",
                                                                             "message": "bad"}]),
                                bq_sink.STAGE, "candid")
    assert dl["table"] == "DIASource" and dl["key"] == "7" and dl["row"] == {"candid": 7, "x": 1}
    assert dl["reason"] == "DIASource: warehouse refused the row: invalid x bad"


def test_pipeline_wiring_and_options():
    """The whole job builds (nothing runs): Pub/Sub read, both writes, dead letters."""
    inst = naming.Instance("ztf", "unit", "pgbctl-local")
    args = pipeline_args(bq_sink.JOB, inst, "local")
    assert f"--runner={LOCAL_RUNNER}" in args and "--streaming" in args and "--job_name=ztf-bq-sink-unit" in args
    gcp = pipeline_args(bq_sink.JOB, inst, "gcp")
    assert "--runner=DataflowRunner" in gcp and f"--temp_location=gs://{inst.bucket('dataflow')}/temp" in gcp
    kw = bq_sink.write_kwargs(inst, "alerts", SCHEMAS["alerts"], "gcp")
    assert kw["table"] == "pgbctl-local:ztf_alerts_unit.alerts" and "test_client" not in kw
    from apache_beam.options.pipeline_options import PipelineOptions

    ep = type("E", (), {"bigquery_url": "http://127.0.0.1:1"})()
    p = beam.Pipeline(options=PipelineOptions(["--runner=" + LOCAL_RUNNER, "--streaming"]))
    bq_sink.build(p, inst, "local", endpoints=ep)
    labels = {t.full_label for t in p.transforms_stack[0].parts}
    assert {"Read", "AlertsToRows", "Write_alerts", "Write_DIASource", "WriteDeadLetters"} <= labels


def test_source_id_column():
    assert bq_sink.source_id_column(SMAP, SCHEMAS["DIASource"]) == "candid"
    assert bq_sink.source_id_column(SMAP, [{"name": "x"}]) == "candidate.candid"


# ---- the fast local executor over fake clients ---------------------------------------------------


class _FakeBQ:
    """insert_rows_json that refuses rows whose candid is in ``refuse``; a query that
    reports ``present`` source ids."""

    def __init__(self, refuse=(), present=()):
        self.refuse, self.present = set(refuse), set(present)
        self.inserted: dict[str, list] = {}

    def insert_rows_json(self, ref, rows_, row_ids=None, **kw):
        errors = []
        table = ref.rsplit(".", 1)[-1]
        for i, r in enumerate(rows_):
            if r["candid"] in self.refuse:
                errors.append({"index": i, "errors": [{"reason": "invalid", "location": "candid", "message": "no"}]})
        ok = [r for i, r in enumerate(rows_) if i not in {e["index"] for e in errors}]
        if errors and not kw.get("skip_invalid_rows"):  # like BigQuery: the rest are "stopped"
            errors += [{"index": i, "errors": [{"reason": "stopped"}]} for i, r in enumerate(rows_) if r in ok]
            ok = []
        self.inserted.setdefault(table, []).extend(ok)
        return errors

    def query(self, sql, job_config=None):
        ids = job_config.query_parameters[0].values
        tables = [t for t in ("alerts", "DIASource") if f"'{t}' AS t" in sql]
        hits = [{"t": t, "sid": i} for t in tables for i in ids if i in self.present]
        return type("J", (), {"result": lambda self, timeout=None: hits})()


class _FakeSub:
    def __init__(self):
        self.acked: list[str] = []

    def acknowledge(self, request):
        self.acked += request["ack_ids"]


def _executor(bq) -> localrun.BqSinkExecutor:
    ex = localrun.BqSinkExecutor.__new__(localrun.BqSinkExecutor)
    ex.inst = naming.Instance("ztf", "unit", "pgbctl-local")
    ex.clients = type("C", (), {"bigquery": bq, "subscriber": _FakeSub(), "backend": "local"})()
    ex.method, ex.batch, ex.max_wait, ex.insert_chunk = "insert", 500, 0.5, 1000
    ex.smap, ex.schemas = SMAP, SCHEMAS
    ex.tables = tuple(SCHEMAS)
    ex.sid_column = {t: "candid" for t in SCHEMAS}
    ex.subscription = "projects/pgbctl-local/subscriptions/ztf-alerts-bq-sink-unit"
    ex.decode = DecodeAlert("ztf", bq_sink.STAGE)
    ex.make_rows = bq_sink.MakeRows("ztf", SCHEMAS)
    for fn in (ex.decode, ex.make_rows):
        fn.setup()
    written = []
    ex.dead_letters = type("D", (), {"write": lambda self, dls: written.extend(dls), "teardown": lambda self: None})()
    ex.written_dead_letters = written
    ex.counts = localrun.Counts(rows={t: 0 for t in ex.tables})
    ex._flow_lock, ex._in_flight, ex._last_activity = threading.Lock(), 0, 0.0
    return ex


def _received(packets_: list[bytes]):
    from google.pubsub_v1.types import PubsubMessage as PM, ReceivedMessage

    return [ReceivedMessage(ack_id=f"a{i}", message=PM(data=p, message_id=f"m{i}")) for i, p in enumerate(packets_)]


def test_executor_dedups_inserts_and_dead_letters_refused_rows(packets):
    good = packets["good"][-6:]
    alerts = [codec.decode(p) for p in good]
    present, refused = alerts[0]["candid"], alerts[1]["candid"]
    bq = _FakeBQ(refuse={refused}, present={present})
    ex = _executor(bq)
    prep = ex.prepare(_received(good + [good[2], packets["bad"][0]]))
    assert prep.in_batch_duplicates == 1 and len(prep.dead) == 1
    ex.write(prep)
    c = ex.counts.as_dict()
    # 6 unique: 1 already in both tables, 1 refused by the warehouse (dead letter per table), 4 new
    assert c["in"] == 8 and c["duplicates"] == 2
    assert c["rows_alerts"] == c["rows_DIASource"] == 4
    assert sorted(r["candid"] for r in bq.inserted["DIASource"]) == sorted(a["candid"] for a in alerts[2:])
    dls = ex.written_dead_letters
    assert len(dls) == 3 and c["dead_letters"] == 3
    refused_dls = [d for d in dls if d.get("table")]
    assert {d["table"] for d in refused_dls} == {"alerts", "DIASource"}
    assert all(d["key"] == str(refused) and "warehouse refused the row" in d["reason"] for d in refused_dls)
    assert sorted(ex.clients.subscriber.acked) == sorted(f"a{i}" for i in range(8))  # acked after writing


def test_pull_batch_returns_what_is_there():
    class Sub:
        def __init__(self, batches):
            self.batches, self.calls = list(batches), []

        def pull(self, request, timeout):
            self.calls.append(request)
            msgs = self.batches.pop(0) if self.batches else []
            return type("R", (), {"received_messages": msgs})()

    s = Sub([[1, 2], [3], []])
    assert localrun.pull_batch(s, "sub", 10, max_wait=1) == [1, 2, 3]
    assert all(c["return_immediately"] for c in s.calls)
    assert localrun.pull_batch(Sub([]), "sub", 10, max_wait=0.1, poll=0.01) == []
    assert localrun.pull_batch(Sub([[1, 2, 3]]), "sub", 2, max_wait=1) == [1, 2, 3][:3]


def test_arrow_schema_matches_tables():
    import pyarrow as pa

    for t, s in SCHEMAS.items():
        sch = localrun.arrow_schema(s)
        assert len(sch) == len(s)
    row = rows.diasource_row(codec.decode(synth.generate(1, seed=1)[0]), SMAP)
    tbl = pa.Table.from_pylist([validate_row(row, SCHEMAS["DIASource"])[0]],
                               schema=localrun.arrow_schema(SCHEMAS["DIASource"]))
    assert tbl.num_rows == 1


def test_prepared_batches_merge_and_count_duplicates():
    a = localrun.Prepared(["a1", "a2"], {1: {"t": "first"}, 2: {}}, [{"dl": 1}], 3, 1)
    b = localrun.Prepared(["b1", "b2"], {2: {"t": "again"}, 3: {}}, [], 2)
    m = a.merge(b)
    assert m.ack_ids == ["a1", "a2", "b1", "b2"] and m.n_in == 5 and m.dead == [{"dl": 1}]
    assert sorted(m.rows) == [1, 2, 3] and m.rows[2] == {} and m.in_batch_duplicates == 2
