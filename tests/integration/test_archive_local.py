"""The Avro archive function on the real local emulators, run exactly as a night runs it:
``python -m pgbctl.functions_runtime upload_bytes_to_bucket --subscription <path>`` pulling from
the instance's ``alerts-upload_bytes_to_bucket`` subscription.

Checks object names, metadata and fixed headers; one notification per object; idempotence
(a duplicate publish and a redelivered message change nothing); corrupt packets dead-lettered
(raw bytes + reason in the dead_letter bucket, a JSON record on the dead_letter topic) without
stopping the function; SIGTERM with a final JSON summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pgbctl import archive, codec, procstatus, schemamap, synth
from pgbctl.paths import REPO_ROOT, shared_data_dir
from itest_helpers import cli, pull_all, wait_for

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:The return_immediately flag is deprecated")]

SMAP = schemamap.load("ztf")
TOPIC = "ztf_20260102_programid1"
CORRUPT = ("garbage", "truncate", "wrong_schema", "empty")


@pytest.fixture()
def instance(local_services):
    from pgbctl import naming

    _, endpoints = local_services
    testid = "ar" + uuid.uuid4().hex[:8]
    code, _, err = cli("create", "--testid", testid, "--yes")
    assert code == 0, err
    yield naming.Instance("ztf", testid, endpoints.project)
    code, _, err = cli("delete", "--testid", testid, "--yes")
    assert code == 0, err


def test_archive_function_on_emulators(instance, local_services, local_clients, tmp_path):
    home, endpoints = local_services
    inst = instance
    c = local_clients
    shared = shared_data_dir()
    good = synth.generate(12, seed=21)
    if shared is not None:
        good += [p.read_bytes() for p in sorted((shared / "ztf" / "alerts").glob("*.avro"))[:6]]
    bad = [synth.corrupt(good[0], how, SMAP) for how in CORRUPT]
    status_file = tmp_path / "fn.status.json"
    env = {**os.environ, **endpoints.env(inst.project), "PGBCTL_BACKEND": "local", "PGBCTL_SURVEY": "ztf",
           "PGBCTL_TESTID": inst.testid, "GCP_PROJECT": inst.project, "PGBCTL_HOME": str(home)}
    sub = f"projects/{inst.project}/subscriptions/{inst.subscription('alerts-upload_bytes_to_bucket')}"
    proc = subprocess.Popen([sys.executable, "-m", "pgbctl.functions_runtime", "upload_bytes_to_bucket",
                             "--subscription", sub, "--status-file", str(status_file)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        topic = c.topic_path(inst.topic("alerts"))
        futures = [c.publisher.publish(topic, p, **{"kafka.topic": TOPIC}) for p in good + bad]
        futures.append(c.publisher.publish(topic, good[1], **{"kafka.topic": TOPIC}))  # the same bytes again
        for f in futures:
            f.result(timeout=60)
        n = len(futures)
        st = wait_for(lambda: (s := procstatus.read(status_file)) and s["counts"]["acked"] == n and s["in_flight"] == 0
                   and s, timeout=90)
        assert st, f"function did not handle {n} messages: {procstatus.read(status_file)}; stderr: {proc.stderr}"
        counts = st["counts"]
        assert counts["stored"] == len(good) and counts["exists"] == 1 and counts["dead_letter"] == len(bad)
        assert counts["failed"] == 0 and proc.poll() is None  # corrupt input never stopped it
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stored"] == len(good) and summary["acked"] == n
    assert procstatus.read(status_file)["state"] == "stopped"

    # objects: name, metadata, a strictly valid (fixed) header, the same values
    blobs = {b.name: b for b in c.storage.list_blobs(inst.bucket("alert_avros"))}
    want = {}
    for p in good:
        a = codec.decode(p)
        want[f"{a['objectId']}.{a['candid']}.{TOPIC}.avro"] = (a, p)
    assert set(blobs) == set(want)
    for name, (a, p) in want.items():
        md = blobs[name].metadata
        assert md["objectId"] == a["objectId"] and md["candid"] == str(a["candid"])
        assert float(md["ra"]) == pytest.approx(a["candidate"]["ra"]) and float(md["dec"]) == pytest.approx(a["candidate"]["dec"])
        assert md["kafka.topic"] == TOPIC and md["schemavsn"] == a["schemavsn"] and md["pubsub.message_id"]
    for name in list(want)[:3] + list(want)[-3:]:
        data = blobs[name].download_as_bytes()
        assert codec.strict_schema_problems(codec.header_schema(data)) == []
        assert codec.decode(data) == want[name][0]

    # one OBJECT_FINALIZE notification per object (the duplicate made none)
    notes = pull_all(c, inst.subscription("alert_avros-counter"))
    assert sorted(m.message.attributes["objectId"] for m in notes) == sorted(want)
    assert {m.message.attributes["eventType"] for m in notes} == {"OBJECT_FINALIZE"}

    # dead letters: the raw bytes + reason in the bucket, a JSON record on the topic
    dl_blobs = list(c.storage.list_blobs(inst.bucket("dead_letter")))
    assert len(dl_blobs) == len(bad)
    assert sorted(b.download_as_bytes() for b in dl_blobs) == sorted(bad)
    for b in dl_blobs:
        assert b.name.startswith("upload_bytes_to_bucket/") and b.metadata["reason"] and "\n" not in b.metadata["reason"]
        assert b.metadata["announced"] == "true" and b.metadata["attr.kafka.topic"] == TOPIC
    recs = [json.loads(m.message.data) for m in pull_all(c, inst.subscription("dead_letter-counter"))]
    assert len(recs) == len(bad)
    assert {r["object"] for r in recs} == {f"{inst.bucket('dead_letter')}/{b.name}" for b in dl_blobs}
    assert all(r["stage"] == "upload_bytes_to_bucket" and r["reason"] for r in recs)
    reasons = " | ".join(r["reason"] for r in recs)
    assert "empty payload" in reasons and "bad magic" in reasons and "truncated" in reasons


def test_redelivered_message_changes_nothing(instance, local_clients):
    """archive.handle with the real clients: the same message handled twice (a redelivery)
    stores one object, once -- same generation, one notification."""
    inst, c = instance, local_clients
    data = synth.generate(1, seed=99)[0]
    kw = dict(smap=SMAP, storage=c.storage, bucket=inst.bucket("alert_avros"),
              dead_letter_bucket=inst.bucket("dead_letter"), publisher=c.publisher,
              dead_letter_topic=c.topic_path(inst.topic("dead_letter")))
    first = archive.handle(data, {"kafka.topic": TOPIC}, "m-1", **kw)
    gen = c.storage.bucket(inst.bucket("alert_avros")).get_blob(first.name).generation
    again = archive.handle(data, {"kafka.topic": TOPIC}, "m-1", **kw)
    assert (first.status, again.status, again.name) == ("stored", "exists", first.name)
    assert c.storage.bucket(inst.bucket("alert_avros")).get_blob(first.name).generation == gen
    notes = wait_for(lambda: pull_all(c, inst.subscription("alert_avros-counter")), timeout=10)
    time.sleep(0.5)
    notes += pull_all(c, inst.subscription("alert_avros-counter"))
    assert [m.message.attributes["objectId"] for m in notes] == [first.name]
    # a dead letter redelivered: stored and announced once
    for _ in range(2):
        assert archive.handle(b"\x00junk", {}, "m-2", **kw).status == "dead_letter"
    time.sleep(0.3)
    assert len(pull_all(c, inst.subscription("dead_letter-counter"))) == 1
