"""value-added on the real local emulators: create an instance, publish synthetic supernova-like
and real ZTF alerts to ``alerts``, run the fast executor (``python -m
pgbctl.localrun_value_added``, the command other components use) until idle, and check what
landed: messages with attributes on ``alerts_pure`` / ``exgalac_trans`` / ``salt2``, rows in
``salt2``, PNGs in the ``sncosmo`` bucket, dead letters. Then SIGTERM handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from pgbctl import codec, naming, schemamap, synth
from pgbctl.paths import REPO_ROOT, shared_data_dir
from itest_helpers import cli

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:The return_immediately flag is deprecated:DeprecationWarning"),
]

_SHARED = shared_data_dir()
if not os.environ.get("SNCOSMO_DATA_DIR") and _SHARED is not None and (_SHARED / "sncosmo").is_dir():
    os.environ["SNCOSMO_DATA_DIR"] = str(_SHARED / "sncosmo")
SMAP = schemamap.load("ztf")
ATTRS = {"objectId", "candid", "ra", "dec", "schemavsn"}


@pytest.fixture()
def instance(local_services):
    _, endpoints = local_services
    testid = "va" + uuid.uuid4().hex[:8]
    code, _, err = cli("create", "--testid", testid, "--yes")
    assert code == 0, err
    yield naming.Instance("ztf", testid, endpoints.project)
    cli("delete", "--testid", testid, "--yes")


def _packets() -> list[bytes]:
    pk = synth.generate(30, seed=2, kind="sn") + synth.generate(10, seed=5)
    if _SHARED is not None:
        pk += [p.read_bytes() for p in sorted((_SHARED / "ztf" / "alerts").glob("*.avro"))[:5]]
        pk += [p.read_bytes() for p in sorted((_SHARED / "ztf" / "ZTF21abiuvdk").glob("*.avro"))[-2:]]
    return pk


def _expected(pk: list[bytes]) -> dict[str, set]:
    from pgbctl.science import filters, salt2

    exp: dict[str, set] = {k: set() for k in ("pure", "exgal", "fitted", "success")}
    for p in pk:
        a = codec.decode(p)
        cid = str(a["candid"])
        if filters.is_pure(a, SMAP).passed:
            exp["pure"].add(cid)
        if filters.is_extragalactic_transient(a, SMAP).passed:
            exp["exgal"].add(cid)
            _, r = salt2.fit_alert(a, SMAP)
            if r is not None:
                exp["fitted"].add(cid)
                if r.success:
                    exp["success"].add(cid)
    return exp


def _publish(clients, inst, packets: list[bytes]) -> None:
    topic = clients.topic_path(inst.topic("alerts"))
    for f in [clients.publisher.publish(topic, p) for p in packets]:
        f.result(timeout=30)


def _drain(clients, inst, stub: str, subscription: str | None = None) -> list:
    """Every message waiting on ``<stub>-counter`` (or ``subscription``), acknowledged."""
    sub = clients.subscription_path(inst.subscription(subscription or f"{stub}-counter"))
    got, empty = [], 0
    while empty < 3:
        resp = clients.subscriber.pull(request={"subscription": sub, "max_messages": 1000,
                                                "return_immediately": True}, timeout=30)
        if not resp.received_messages:
            empty += 1
            time.sleep(0.2)
            continue
        got += [rm.message for rm in resp.received_messages]
        clients.subscriber.acknowledge(request={"subscription": sub,
                                                "ack_ids": [rm.ack_id for rm in resp.received_messages]})
    return got


class _Executor:
    """``python -m pgbctl.localrun_value_added`` in a child process; its output goes to files
    (a pipe nobody reads while it runs would fill up and block it)."""

    def __init__(self, inst, home, *extra: str):
        import tempfile

        cmd = [sys.executable, "-m", "pgbctl.localrun_value_added", "--survey", inst.survey, "--testid",
               inst.testid, "--project", inst.project, "--log-every", "1", *extra]
        env = dict(os.environ, PGBCTL_HOME=str(home))
        self._out = tempfile.TemporaryFile("w+")
        self._err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=self._out, stderr=self._err, text=True)

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def poll(self):
        return self.proc.poll()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)

    @property
    def returncode(self):
        return self.proc.returncode

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    def communicate(self, timeout: float) -> tuple[str, str]:
        self.proc.wait(timeout=timeout)
        self._out.seek(0)
        return self._out.read(), self.stderr()


def _executor(inst, home, *extra: str) -> _Executor:
    return _Executor(inst, home, *extra)


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_value_added_fast_executor_end_to_end(instance, local_services, local_clients):
    home, _ = local_services
    inst, clients = instance, local_clients
    pk = _packets()
    exp = _expected(pk)
    assert exp["success"] and exp["pure"] and exp["exgal"] - exp["pure"]
    _publish(clients, inst, pk + [pk[0], b"not an alert"])  # + a duplicate and a junk packet

    t0 = time.monotonic()
    proc = _executor(inst, home, "--exit-when-idle", "4", "--batch", "20")
    out, err = proc.communicate(timeout=150)
    assert proc.returncode == 0, err[-3000:]
    s = _summary(out)
    print(f"\n[value-added executor: {time.monotonic() - t0:.1f}s wall, {s}]")
    assert "error" not in s
    assert s["in"] == len(pk) + 2
    assert s["duplicates"] == 1 and s["dead_letters"] == 1
    assert s["alerts_pure"] == len(exp["pure"]) and s["exgalac_trans"] == len(exp["exgal"])
    assert s["fits"] == len(exp["fitted"]) and s["fit_succeeded"] == len(exp["success"])
    assert s["salt2"] == s["figures"] == len(exp["success"]) and s["rows_salt2"] == len(exp["fitted"])
    assert sum(s["rejected"]["purity"].values()) >= len(pk) - len(exp["pure"])
    assert "value-added: in=" in err  # count lines on stderr

    # messages, with attributes, on the three topics
    for stub, want in (("alerts_pure", exp["pure"]), ("exgalac_trans", exp["exgal"]), ("salt2", exp["success"])):
        msgs = _drain(clients, inst, stub)
        assert sorted(m.attributes["candid"] for m in msgs) == sorted(want), stub
        for m in msgs:
            assert set(m.attributes) == ATTRS
            body = json.loads(m.data)
            alert = body["alert"] if stub == "salt2" else body
            assert alert["objectId"] == m.attributes["objectId"] and "cutoutScience" not in alert
            if stub == "salt2":
                assert body["salt2Fit"]["success"] is True
                assert body["salt2Fit"]["plot_uri"].startswith(f"gs://{inst.bucket('sncosmo')}/salt2/plot_lc/")

    # salt2 rows (NaN -> null), PNGs in the bucket
    rows = list(clients.bigquery.query(f"SELECT * FROM `{inst.table('salt2')}`").result(timeout=60))
    assert sorted(str(r["candid"]) for r in rows) == sorted(exp["fitted"])
    assert {str(r["candid"]) for r in rows if r["success"]} == exp["success"]
    for r in rows:
        if not r["success"]:
            assert r["message"] and r["plot_uri"] is None
    blobs = {b.name: b for b in clients.storage.list_blobs(inst.bucket("sncosmo"), prefix="salt2/plot_lc/")}
    assert len(blobs) == len(exp["success"])
    for r in rows:
        if r["success"]:
            name = r["plot_uri"].split("/", 3)[3]
            assert blobs[name].content_type == "image/png"
    png = next(iter(blobs.values())).download_as_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    dl = list(clients.storage.list_blobs(inst.bucket("dead_letter"), prefix="value-added/"))
    assert len(dl) == 1

    # a second run over the same alerts (e.g. a replay): the salt2 rows are not doubled
    _publish(clients, inst, pk[-3:])
    proc = _executor(inst, home, "--exit-when-idle", "3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    rows2 = list(clients.bigquery.query(f"SELECT candid FROM `{inst.table('salt2')}`").result(timeout=60))
    assert len(rows2) == len(rows)


def test_value_added_sigterm_finishes_the_batch(instance, local_services, local_clients):
    """SIGTERM in the middle of a stream: the batch being written is finished and acknowledged,
    the rest goes back to the subscription (nothing lost, nothing half-done), exit code 0."""
    home, _ = local_services
    inst, clients = instance, local_clients
    from pgbctl import procstatus

    pk = synth.generate(80, seed=8, kind="sn")
    _publish(clients, inst, pk)
    status_file = home / f"{inst.beam_job('value-added')}.status.json"
    # no --exit-when-idle: runs until told to stop; the status file `pgbctl night` watches
    proc = _executor(inst, home, "--batch", "10", "--status-file", str(status_file))
    try:
        deadline = time.monotonic() + 90
        sub = clients.subscription_path(inst.subscription("exgalac_trans-counter"))
        while time.monotonic() < deadline:  # wait for the first batch's output
            resp = clients.subscriber.pull(request={"subscription": sub, "max_messages": 1,
                                                    "return_immediately": True}, timeout=10)
            if resp.received_messages:
                break
            time.sleep(0.2)
        st = procstatus.read(status_file)
        assert st and st["state"] == "running" and st["process"] == "value-added", st
        assert st["in_flight"] >= 0 and "in" in st["counts"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    s = _summary(out)
    assert "error" not in s and "signal 15" in err, s
    assert 0 < s["in"] < len(pk), s  # stopped mid-stream
    st = procstatus.read(status_file)
    assert st["state"] == "stopped" and st["in_flight"] == 0 and st["counts"]["in"] == s["in"], st
    # what was not processed is back on the job's subscription, unacknowledged
    left = _drain(clients, inst, "alerts", subscription="alerts-value-added")
    assert s["in"] + len(left) == len(pk)
    rows = list(clients.bigquery.query(f"SELECT candid FROM `{inst.table('salt2')}`").result(timeout=60))
    assert len(rows) == s["rows_salt2"]


def test_value_added_survives_a_storage_restart(instance, local_services, local_clients):
    """``pgbctl create`` of another instance restarts the storage emulator (its notification
    settings), possibly on another port: a running executor keeps writing PNGs."""
    home, _ = local_services
    inst, clients = instance, local_clients
    other = "vb" + uuid.uuid4().hex[:8]
    proc = _executor(inst, home, "--batch", "10")
    try:
        first = synth.generate(20, seed=31, kind="sn")
        _publish(clients, inst, first)

        def n_png(c):
            return sum(1 for _ in c.storage.list_blobs(c.storage.bucket(inst.bucket("sncosmo")),
                                                       prefix="salt2/plot_lc/"))

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and n_png(clients) == 0:
            time.sleep(0.5)
        assert n_png(clients) > 0
        code, _, err = cli("create", "--testid", other, "--yes")  # restarts the storage emulator
        assert code == 0, err
        from pgbctl.clients import Clients
        from pgbctl.local import services

        now = Clients.for_backend("local", inst.project, services.endpoints(home))
        try:
            before = n_png(now)
            _publish(now, inst, synth.generate(20, seed=32, kind="sn"))
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and n_png(now) <= before:
                time.sleep(0.5)
            assert n_png(now) > before, ("no PNG written after the storage emulator restarted: "
                                         + proc.stderr()[-3000:])
        finally:
            now.close()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        cli("delete", "--testid", other, "--yes")
    assert proc.returncode == 0, err[-3000:]
    assert "error" not in _summary(out)


def test_value_added_beam_pipeline_on_the_direct_runner(instance, local_services, local_clients):
    """The job's real Beam graph (``python -m beam_jobs.value_added --backend local``: the
    bundle-based DirectRunner, ReadFromPubSub, WriteToPubSub, WriteToBigQuery, figure
    uploads) against the emulators, on a few alerts; stopped with SIGINT once they are out."""
    home, _ = local_services
    inst, clients = instance, local_clients
    pk = synth.generate(12, seed=2, kind="sn")
    exp = _expected(pk)
    _publish(clients, inst, pk)
    import tempfile

    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "beam_jobs.value_added", "--survey", "ztf", "--testid", inst.testid,
         "--project", inst.project, "--backend", "local", "--home", str(home)],
        cwd=str(REPO_ROOT), env=dict(os.environ, PGBCTL_HOME=str(home)), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        rows = pngs = 0
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(2)
            rows = list(clients.bigquery.query(f"SELECT COUNT(*) FROM `{inst.table('salt2')}`").result())[0][0]
            pngs = sum(1 for _ in clients.storage.list_blobs(inst.bucket("sncosmo"), prefix="salt2/plot_lc/"))
            if rows >= len(exp["fitted"]) and pngs >= len(exp["success"]):
                break
        log.seek(0)
        assert proc.poll() is None, log.read()[-3000:]
        assert (rows, pngs) == (len(exp["fitted"]), len(exp["success"]))
        for stub, want in (("alerts_pure", exp["pure"]), ("exgalac_trans", exp["exgal"]),
                           ("salt2", exp["success"])):
            msgs = _drain(clients, inst, stub)
            assert sorted(m.attributes["candid"] for m in msgs) == sorted(want), stub
            assert all(set(m.attributes) == ATTRS for m in msgs)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
