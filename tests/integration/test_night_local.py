"""A whole local night, driven through the CLI: create an instance -> ``night start`` ->
publish real (when present) + synthetic alerts, one duplicate (the same bytes again) and one
corrupt packet -> ``night end`` (drains) -> the counts reconcile EXACTLY:

    objects in alert_avros = unique valid alerts = rows in alerts = rows in DIASource
    = OBJECT_FINALIZE notifications on alert_avros-counter

and the corrupt packet is in the dead letters of both stages (bucket + topic). Then the
instance is deleted. Also: idempotent start/end, --dry-run, --json, bad --jobs, gcp refusal."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from pgbctl import codec, naming, synth
from pgbctl.paths import shared_data_dir
from itest_helpers import cli, pull_all

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:The return_immediately flag is deprecated")]

N_SYNTHETIC = 300


def _count(clients, sub: str) -> int:
    from pgbctl.backends.local import LocalBackend

    be = LocalBackend(clients.project)
    be._clients = clients
    return be.count_waiting(sub)


@pytest.fixture()
def testid(local_services):
    t = "nt" + uuid.uuid4().hex[:8]
    code, _, err = cli("create", "--testid", t, "--yes")
    assert code == 0, err
    yield t
    cli("night", "end", "--testid", t, "--no-drain")  # in case the test failed half-way
    code, _, err = cli("delete", "--testid", t, "--yes")
    assert code == 0, err


def test_full_local_night_reconciles(testid, local_services, local_clients):
    home, endpoints = local_services
    c = local_clients
    inst = naming.Instance("ztf", testid, endpoints.project)

    # --- dry run, then start (twice: idempotent) ------------------------------------------------
    code, out, err = cli("night", "start", "--testid", testid, "--jobs", "bq-sink", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["dry_run"] and [p["name"] for p in plan["processes"]] == [
        inst.function("upload_bytes_to_bucket"), inst.beam_job("bq-sink")]
    assert {p["action"] for p in plan["processes"]} == {"would-start"}
    assert cli("night", "status", "--testid", testid, "--json")[1].count('"name"') == 0  # nothing started

    t0 = time.monotonic()
    code, out, err = cli("night", "start", "--testid", testid, "--jobs", "bq-sink", "--json")
    assert code == 0, err
    started = json.loads(out)
    assert [p["action"] for p in started["processes"]] == ["started", "started"]
    t_start = time.monotonic() - t0
    code, out, err = cli("night", "start", "--testid", testid, "--jobs", "bq-sink", "--json")
    assert code == 0, err
    assert [p["action"] for p in json.loads(out)["processes"]] == ["already-running", "already-running"]
    # the instance's status lists them (LocalBackend.processes finds them by name)
    code, out, err = cli("status", "--testid", testid, "--json", "--no-count")
    assert {p["name"] for p in json.loads(out)["processes"]} == {p["name"] for p in started["processes"]}

    # --- publish: real + synthetic, one duplicate, one corrupt packet -------------------------------
    shared = shared_data_dir()
    real = [p.read_bytes() for p in sorted((shared / "ztf" / "alerts").glob("*.avro"))] if shared else []
    synthetic = synth.generate(N_SYNTHETIC, seed=31)
    good = real + synthetic
    unique = {}
    for p in good:
        a = codec.decode(p)
        unique.setdefault(a["candid"], a["objectId"])
    corrupt = synth.corrupt(synthetic[0], "truncate")
    topic = c.topic_path(inst.topic("alerts"))
    from pgbctl import simulate as sim
    from pgbctl.schemamap import load

    smap = load("ztf")
    t_pub = time.monotonic()
    futures = [c.publisher.publish(topic, p, **sim.attributes_for(p, smap)) for p in good]
    futures.append(c.publisher.publish(topic, good[-1], **sim.attributes_for(good[-1], smap)))  # duplicate
    futures.append(c.publisher.publish(topic, corrupt, **{"kafka.topic": "ztf_20260101_programid1"}))
    for f in futures:
        f.result(timeout=120)
    published = len(futures)

    # --- end: drain, stop, final counts --------------------------------------------------------------
    code, out, err = cli("night", "end", "--testid", testid, "--timeout", "180", "--json")
    t_end = time.monotonic()
    assert code == 0, err
    ended = json.loads(out)
    assert ended["drained"] is True
    final = {p["name"]: p for p in ended["processes"]}
    fn = final[inst.function("upload_bytes_to_bucket")]
    bq = final[inst.beam_job("bq-sink")]
    assert fn["result"] == bq["result"] == "stopped"
    assert fn["counts"]["acked"] == published and fn["counts"]["failed"] == 0
    assert fn["counts"]["stored"] == len(unique) and fn["counts"]["exists"] == 1 and fn["counts"]["dead_letter"] == 1
    assert bq["counts"]["in"] == published and bq["counts"]["duplicates"] == 1 and bq["counts"]["dead_letters"] == 1
    assert bq["counts"]["rows_alerts"] == bq["counts"]["rows_DIASource"] == len(unique)

    # --- the stores reconcile exactly ---------------------------------------------------------------
    objects = [b.name for b in c.storage.list_blobs(inst.bucket("alert_avros"))]
    n_alerts = list(c.bigquery.query(f"SELECT COUNT(*) n, COUNT(DISTINCT candid) d FROM `{inst.table('alerts')}`").result())[0]
    n_dia = list(c.bigquery.query(f"SELECT COUNT(*) n, COUNT(DISTINCT candid) d FROM `{inst.table('DIASource')}`").result())[0]
    notes = pull_all(c, inst.subscription("alert_avros-counter"))
    assert len(objects) == len(unique) == n_alerts["n"] == n_alerts["d"] == n_dia["n"] == n_dia["d"]
    assert sorted(m.message.attributes["objectId"] for m in notes) == sorted(objects)
    assert {o.split(".")[1] for o in objects} == {str(k) for k in unique}
    assert _count(c, inst.subscription("alerts-counter")) == published
    for sub in ("alerts-upload_bytes_to_bucket", "alerts-bq-sink"):
        assert _count(c, inst.subscription(sub)) == 0, f"{sub} not drained"

    # the corrupt packet: in the dead_letter bucket and on the dead_letter topic, for both stages
    dls = {b.name.split("/")[0]: b for b in c.storage.list_blobs(inst.bucket("dead_letter"))}
    assert set(dls) == {"upload_bytes_to_bucket", "bq-sink"}
    for b in dls.values():
        assert b.download_as_bytes() == corrupt and "truncated" in b.metadata["reason"]
    recs = [json.loads(m.message.data) for m in pull_all(c, inst.subscription("dead_letter-counter"))]
    assert sorted(r["stage"] for r in recs) == ["bq-sink", "upload_bytes_to_bucket"]
    assert all("truncated" in r["reason"] and r["message_id"] for r in recs)

    # --- ending again: nothing to do ------------------------------------------------------------------
    code, out, err = cli("night", "end", "--testid", testid, "--json")
    assert code == 0 and json.loads(out)["processes"] == [] and "nothing to stop" in err
    print(f"\n[night: start {t_start:.1f}s; {published} messages published -> drained and stopped "
          f"{t_end - t_pub:.1f}s after the first publish]")


def test_night_cli_errors(local_services):
    code, _, err = cli("night", "start", "--testid", "nosuch", "--jobs", "nope")
    assert code == 2 and "unknown job 'nope'" in err
    code, _, err = cli("night", "start", "--testid", "nosuch", "--jobs", "bq-sink")
    assert code == 1 and "pgbctl create --testid nosuch" in err and "\n" not in err.strip()
    code, _, err = cli("night", "start", "--testid", "nosuch", "--kafka-topic", "ztf_20260101_programid1")
    assert code == 1 and "--kafka-topic NONE" in err
    code, _, err = cli("night", "start", "--testid", "nosuch", "--backend", "gcp")
    assert code == 1 and "not yet implemented on gcp" in err
    code, out, err = cli("night", "end", "--testid", "nosuch", "--json")
    assert code == 0 and json.loads(out)["processes"] == []
