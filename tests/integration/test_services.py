"""Integration tests of the local services and the official clients built by pgbctl.clients."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from pgbctl import paths
from pgbctl.local import services as svc
from pgbctl.local.procs import pid_alive, proc_stat
from itest_helpers import wait_for

pytestmark = pytest.mark.integration

PY = sys.executable


def _uid() -> str:
    return uuid.uuid4().hex[:8]


# ----------------------------------------------------------------------------- services


def test_status_all_healthy(local_services):
    home, ep = local_services
    st = svc.status(home)
    assert set(st) == {"pubsub", "storage", "warehouse"}
    for name, info in st.items():
        assert info.running and info.healthy, (name, info)
        assert info.pid and pid_alive(info.pid)
        assert info.uptime is not None and info.uptime >= 0
        assert info.log.exists()
        assert (home / "services" / f"{name}.pid").read_text().strip() == str(info.pid)
        assert json.loads((home / "services" / f"{name}.json").read_text())["ports"]["port"] == info.port
        assert proc_stat(info.pid)[1] == info.pid  # its own process group
    assert len({i.port for i in st.values()}) == 3
    assert ep.pubsub_host == f"127.0.0.1:{st['pubsub'].port}"
    assert ep.storage_url == f"http://127.0.0.1:{st['storage'].port}"
    assert ep.bigquery_url == f"http://127.0.0.1:{st['warehouse'].port}"
    env = ep.env()
    assert env["PUBSUB_EMULATOR_HOST"] == ep.pubsub_host
    assert env["STORAGE_EMULATOR_HOST"] == ep.storage_url
    assert env["BIGQUERY_EMULATOR_HOST"] == ep.bigquery_url
    assert env["PUBSUB_PROJECT_ID"] == env["GOOGLE_CLOUD_PROJECT"] == ep.project


def test_up_is_idempotent(local_services):
    home, _ = local_services
    before = {n: i.pid for n, i in svc.status(home).items()}
    t0 = time.monotonic()
    after = {n: i.pid for n, i in svc.up(home=home).items()}
    assert after == before
    assert time.monotonic() - t0 < 3.0


def test_pubsub_large_messages(local_clients):
    c = local_clients
    topic, sub = c.topic_path(f"big-{_uid()}"), c.subscription_path(f"big-sub-{_uid()}")
    c.publisher.create_topic(name=topic)
    c.subscriber.create_subscription(name=sub, topic=topic, ack_deadline_seconds=60)
    payload = os.urandom(300_000)
    n = 20

    t0 = time.monotonic()
    for f in [c.publisher.publish(topic, payload, i=str(i)) for i in range(n)]:
        f.result(timeout=30)
    t_pub = time.monotonic() - t0
    got = []
    while len(got) < n:  # one pull response carries all of them (~6 MB > 4 MB default)
        resp = c.subscriber.pull(subscription=sub, max_messages=100, timeout=20)
        got += resp.received_messages
        c.subscriber.acknowledge(subscription=sub, ack_ids=[m.ack_id for m in resp.received_messages])
    assert len(got) == n and all(m.message.data == payload for m in got)

    # streaming pull (silently delivers nothing with a default emulator client)
    for f in [c.publisher.publish(topic, payload) for _ in range(n)]:
        f.result(timeout=30)
    streamed = []
    fut = c.subscriber.subscribe(sub, lambda m: (streamed.append(len(m.data)), m.ack()))
    try:
        assert wait_for(lambda: len(streamed) >= n, timeout=20), len(streamed)
    finally:
        fut.cancel()
        try:
            fut.result(timeout=10)
        except Exception:  # noqa: BLE001 - cancelled
            pass
    assert streamed[:n] == [len(payload)] * n
    print(f"\n[pubsub: published {n} x 300 KB in {t_pub:.2f}s]")


def test_gcs_notification_reaches_pubsub(local_services, local_clients):
    home, _ = local_services
    c = local_clients
    topic, sub = c.topic_path(f"avros-{_uid()}"), c.subscription_path(f"avros-sub-{_uid()}")
    c.publisher.create_topic(name=topic)
    c.subscriber.create_subscription(name=sub, topic=topic)

    bucket = c.storage.create_bucket(f"bkt-{_uid()}")
    old = svc.status(home)
    st = svc.up(home=home, gcs_notify_topic=topic)
    assert st["storage"].pid != old["storage"].pid  # restarted with the new topic
    assert st["pubsub"].pid == old["pubsub"].pid and st["warehouse"].pid == old["warehouse"].pid
    assert st["storage"].options["notify"]["topic"] == topic.rsplit("/", 1)[1]
    assert svc.up(home=home)["storage"].pid == st["storage"].pid  # KEEP: no restart

    # the bucket made before the restart survived (filesystem backend)
    assert c.storage.lookup_bucket(bucket.name) is not None
    blob = c.storage.bucket(bucket.name).blob("ZTF/2024/alert_1.avro")
    blob.upload_from_string(b"x" * 70_000, content_type="application/avro-binary")

    msgs = []

    def pull():
        r = c.subscriber.pull(subscription=sub, max_messages=10, timeout=5)
        if r.received_messages:
            c.subscriber.acknowledge(subscription=sub, ack_ids=[m.ack_id for m in r.received_messages])
        msgs.extend(r.received_messages)
        return msgs

    assert wait_for(pull, timeout=15, every=0.2)
    a = dict(msgs[0].message.attributes)
    assert a["eventType"] == "OBJECT_FINALIZE"
    assert a["bucketId"] == bucket.name
    assert a["objectId"] == "ZTF/2024/alert_1.avro"
    assert a["payloadFormat"] == "JSON_API_V1"
    body = json.loads(msgs[0].message.data)
    assert body["name"] == "ZTF/2024/alert_1.avro" and body["size"] == "70000"


def test_warehouse(local_clients, local_endpoints, tmp_path):
    from google.api_core import exceptions as gexc
    from google.api_core.retry import Retry
    from google.cloud import bigquery

    bq = local_clients.bigquery
    ds = f"ds_{_uid()}"
    bq.create_dataset(ds)
    schema = [
        bigquery.SchemaField("objectId", "STRING", mode="REQUIRED"),
        bigquery.SchemaField("candid", "INTEGER"),
        bigquery.SchemaField("candidate", "RECORD", fields=[
            bigquery.SchemaField("ra", "FLOAT"), bigquery.SchemaField("magpsf", "FLOAT")]),
        bigquery.SchemaField("prv", "RECORD", mode="REPEATED", fields=[
            bigquery.SchemaField("jd", "FLOAT"), bigquery.SchemaField("mag", "FLOAT")]),
    ]
    table = f"{local_endpoints.project}.{ds}.alerts"
    bq.create_table(bigquery.Table(table, schema=schema))
    got = bq.get_table(table).schema
    assert [(f.field_type, f.mode) for f in got] == [("STRING", "REQUIRED"), ("INTEGER", "NULLABLE"),
                                                     ("RECORD", "NULLABLE"), ("RECORD", "REPEATED")]
    rows = [{"objectId": "ZTF1", "candid": 1, "candidate": {"ra": 1.5, "magpsf": 18.0},
             "prv": [{"jd": 1.0, "mag": 19.0}, {"jd": 2.0, "mag": 19.5}]},
            {"objectId": "ZTF2", "candid": 2, "prv": []}]
    assert bq.insert_rows_json(table, rows) == []
    assert list(bq.query(f"SELECT COUNT(*) AS n FROM `{table}`").result())[0]["n"] == 2
    un = [tuple(r) for r in bq.query(
        f"SELECT a.objectId, p.jd FROM `{table}` AS a, UNNEST(a.prv) AS p ORDER BY p.jd").result()]
    assert un == [("ZTF1", 1.0), ("ZTF1", 2.0)]
    assert [tuple(r) for r in bq.query(
        f"SELECT candidate.magpsf FROM `{table}` WHERE candidate.ra > 1").result()] == [(18.0,)]

    # Known limitation: a wrong-typed value -> HTTP 500 for the batch (no per-row errors).
    # Whatever the emulator does, it must not hang the caller when a retry deadline is given.
    t0 = time.monotonic()
    try:
        errors = bq.insert_rows_json(table, [{"objectId": "BAD", "candid": "not-an-int"}],
                                     retry=Retry(timeout=3), timeout=5)
        assert errors, "a bad row must be reported"
    except (gexc.GoogleAPICallError, gexc.RetryError):
        pass
    assert time.monotonic() - t0 < 15

    # two processes inserting concurrently + the reader here
    script = tmp_path / "insert.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pgbctl import paths
        from pgbctl.local import endpoints
        from pgbctl.clients import Clients
        c = Clients.for_backend("local", {local_endpoints.project!r}, endpoints())
        tag, n = sys.argv[1], int(sys.argv[2])
        rows = [{{"objectId": f"{{tag}}-{{i}}", "candid": i, "candidate": {{"ra": 0.1, "magpsf": 18.0}},
                 "prv": [{{"jd": float(j), "mag": 19.0}} for j in range(5)]}} for i in range(n)]
        t0 = time.monotonic()
        for k in range(0, n, 500):
            assert c.bigquery.insert_rows_json({table!r}, rows[k:k + 500]) == []
        print(n / (time.monotonic() - t0))
    """))
    env = {**os.environ, **local_endpoints.env(), "PYTHONPATH": str(paths.REPO_ROOT)}
    n = 2000
    procs = [subprocess.Popen([PY, str(script), tag, str(n)], env=env, stdout=subprocess.PIPE, text=True)
             for tag in ("A", "B")]
    reads = 0
    while any(p.poll() is None for p in procs):
        list(bq.query(f"SELECT COUNT(*) FROM `{table}`").result())
        reads += 1
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    rates = [float(o.strip().splitlines()[-1]) for o in outs]
    counts = dict(tuple(r) for r in bq.query(
        f"SELECT SUBSTR(objectId, 1, 1) AS t, COUNT(DISTINCT objectId) FROM `{table}` "
        f"WHERE objectId LIKE 'A-%' OR objectId LIKE 'B-%' GROUP BY t").result())
    assert counts == {"A": n, "B": n}
    print(f"\n[warehouse: 2 writers {rates[0]:.0f} + {rates[1]:.0f} rows/s, {reads} concurrent reads]")


# ----------------------------------------------------------------------------- supervisor

_DRAINER = textwrap.dedent("""
    import signal, sys, time, subprocess
    marker = sys.argv[1]
    child = subprocess.Popen(["sleep", "300"])          # a grandchild in the same group
    def term(*_):
        open(marker, "w").write("drained")
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    print("ready", child.pid, flush=True)
    while True:
        time.sleep(0.1)
""")


_READY = re.compile(r"^ready (\d+)$", re.M)  # the process's own line, not the log's start header


def test_supervised_process_lifecycle(tmp_path):
    home = tmp_path / "home"
    marker = tmp_path / "drained"
    argv = [PY, "-c", _DRAINER, str(marker)]
    info = svc.start_process("consumer", argv, {"X_TEST": "1"}, home=home)
    assert info.running and info.pid
    assert wait_for(lambda: _READY.search((home / "procs" / "consumer.log").read_text()))
    grandchild = int(_READY.search((home / "procs" / "consumer.log").read_text()).group(1))
    assert svc.start_process("consumer", argv, home=home).pid == info.pid  # idempotent
    with pytest.raises(svc.LocalServicesError):
        svc.start_process("consumer", [PY, "-c", "pass"], home=home)
    assert svc.list_processes(home)["consumer"].running
    assert svc.stop_process("consumer", drain_timeout=10, home=home)
    assert marker.read_text() == "drained"  # got SIGTERM and drained
    assert not pid_alive(info.pid) and not pid_alive(grandchild)
    assert "consumer" not in svc.list_processes(home)
    assert not svc.stop_process("consumer", home=home)


def test_stop_kills_process_ignoring_sigterm(tmp_path):
    home = tmp_path / "home"
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ok', flush=True); time.sleep(300)"
    info = svc.start_process("stubborn", [PY, "-c", code], home=home)
    assert wait_for(lambda: "ok" in (home / "procs" / "stubborn.log").read_text())
    t0 = time.monotonic()
    assert svc.stop_process("stubborn", drain_timeout=0.5, home=home)
    assert not pid_alive(info.pid) and time.monotonic() - t0 < 6


def test_restart_on_crash(tmp_path):
    home = tmp_path / "home"
    counter = tmp_path / "runs"
    code = textwrap.dedent(f"""
        import pathlib, sys, time
        p = pathlib.Path({str(counter)!r})
        n = int(p.read_text()) if p.exists() else 0
        p.write_text(str(n + 1))
        if n == 0:
            sys.exit(3)          # crash the first time
        time.sleep(300)
    """)
    svc.start_process("flaky", [PY, "-c", code], home=home, restart_on_crash=True, max_restarts=3)
    info = wait_for(lambda: (i := svc.list_processes(home)["flaky"]).restarts >= 1 and i.state == "running"
                 and counter.read_text() == "2" and i)  # the restarted child has started
    assert info and info.running and info.last_exit == 3
    child = info.child_pid
    assert child and pid_alive(child)
    assert svc.stop_process("flaky", drain_timeout=5, home=home)
    assert not pid_alive(info.pid) and not pid_alive(child)


def test_stale_pid_files_are_not_trusted(tmp_path):
    home = tmp_path / "home"
    (home / "services").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # some unrelated program
    try:
        st = proc_stat(other.pid)
        # pid alive but another program (cmdline), and a pid file whose pid is dead
        (home / "services" / "pubsub.pid").write_text(f"{other.pid}\n")
        (home / "services" / "storage.json").write_text(json.dumps({
            "name": "storage", "kind": "service", "pid": other.pid, "start_ticks": st[2] + 1,  # reused pid
            "argv": [], "marker": "fake-gcs-server", "log": "x", "started_at": 0, "ports": {"port": 1}}))
        (home / "services" / "warehouse.pid").write_text("999999999\n")
        st_ = svc.status(home)
        assert not any(i.running for i in st_.values())
        svc.down(home)
        assert other.poll() is None  # never signalled
        assert not list((home / "services").glob("*.pid"))
    finally:
        other.kill()
        other.wait()


def test_up_down_leaves_no_processes(tmp_path):
    home = tmp_path / "home"
    t0 = time.monotonic()
    st = svc.up(home=home, timeout=60)
    cold = time.monotonic() - t0
    assert all(i.healthy for i in st.values())
    svc.start_process("sleeper", [PY, "-c", _DRAINER, str(tmp_path / "m")], home=home)
    assert wait_for(lambda: _READY.search((home / "procs" / "sleeper.log").read_text()))
    pids = svc.all_pids(home)
    assert len(pids) >= 5  # 3 services + process + its grandchild
    t0 = time.monotonic()
    res = svc.down(home)
    t_down = time.monotonic() - t0
    assert res["process:sleeper"] in ("stopped", "killed")
    survivors = [p for p in pids if pid_alive(p)]
    assert survivors == []
    assert svc.all_pids(home) == []
    assert not any(i.running for i in svc.status(home).values())
    with pytest.raises(svc.LocalServicesError):
        svc.endpoints(home)
    print(f"\n[cold up of all services {cold:.2f}s, down {t_down:.2f}s]")


def test_unknown_service_rejected(tmp_path):
    with pytest.raises(ValueError):
        svc.up(["kafka"], home=tmp_path)
