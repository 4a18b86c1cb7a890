"""pgbctl.night's pure parts: which processes a night runs, the job list, draining decisions
and final counts (no emulators, no processes)."""

from __future__ import annotations

import json
import time

import pytest

from pgbctl import naming, night, procstatus

INST = naming.Instance("ztf", "t1", "my-project")


def test_night_processes_names_argv_env(tmp_path):
    specs = night.night_processes(INST, ["bq-sink"], home=tmp_path, python="/py", base_env={"X": "1"})
    assert [s.name for s in specs] == [INST.function("upload_bytes_to_bucket"), INST.beam_job("bq-sink")]
    assert [s.name for s in specs] == ["ztf-upload_bytes_to_bucket-t1", "ztf-bq-sink-t1"]
    # LocalBackend.processes finds them: "<survey>-" ... "-<testid>"
    assert all(s.name.startswith("ztf-") and s.name.endswith("-t1") for s in specs)
    fn, bq = specs
    assert fn.argv == ("/py", "-m", "pgbctl.functions_runtime", "upload_bytes_to_bucket", "--subscription",
                       "projects/my-project/subscriptions/ztf-alerts-upload_bytes_to_bucket-t1")
    assert bq.argv[:4] == ("/py", "-m", "pgbctl.localrun", "bq-sink") and "--testid" in bq.argv
    assert bq.subscription == "ztf-alerts-bq-sink-t1"
    for s in specs:
        assert s.env["X"] == "1" and s.env["PGBCTL_TESTID"] == "t1" and s.env["GCP_PROJECT"] == "my-project"
        assert s.env["PGBCTL_STATUS_FILE"] == s.status_file == str(tmp_path / "night" / f"{s.name}.status.json")
    prod = night.night_processes(naming.Instance("ztf", None, "my-project"), [], home=tmp_path)
    assert [s.name for s in prod] == ["ztf-upload_bytes_to_bucket"] and prod[0].env["PGBCTL_TESTID"] == ""


def test_jobs_are_data_driven(tmp_path):
    (tmp_path / "beam_jobs").mkdir()
    (tmp_path / "beam_jobs" / "bq_sink.py").write_text("")
    assert night.default_jobs(tmp_path) == ["bq-sink"]  # value-added's code is not there
    with pytest.raises(ValueError, match="not available in this checkout"):
        night.parse_jobs("value-added", tmp_path)
    (tmp_path / "beam_jobs" / "value_added.py").write_text("")
    (tmp_path / "pgbctl").mkdir()
    (tmp_path / "pgbctl" / "localrun_value_added.py").write_text("")
    assert night.default_jobs(tmp_path) == ["bq-sink", "value-added"]
    assert night.parse_jobs("bq-sink, value-added,bq-sink", tmp_path) == ["bq-sink", "value-added"]
    assert night.parse_jobs("none", tmp_path) == [] and night.parse_jobs(None, tmp_path) == night.default_jobs(tmp_path)
    with pytest.raises(ValueError, match="unknown job 'nope'"):
        night.parse_jobs("nope", tmp_path)


def test_drain_waits_for_idle_processes_and_empty_subscriptions(tmp_path):
    sf = tmp_path / "p.status.json"
    procs = {"p": {"subscription": "s", "status_file": str(sf)}}
    procstatus.write(sf, {"state": "running", "in_flight": 3, "last_activity": time.time()})
    calls = []

    def count(s):
        calls.append(s)
        return 0

    ok, waiting, _, why = night.drain(procs, count, timeout=0.6, quiet=0.2, alive=lambda: {"p"})
    assert not ok and "still busy: p" in why and waiting == {"s": 0}  # busy: never declared drained
    procstatus.write(sf, {"state": "running", "in_flight": 0, "last_activity": time.time() - 5})
    ok, waiting, _, why = night.drain(procs, count, timeout=5, quiet=0.2, alive=lambda: {"p"})
    assert ok and why == "" and waiting == {"s": 0}
    ok, _, _, why = night.drain(procs, count, timeout=5, alive=lambda: set())
    assert not ok and "not running any more: p" in why

    def missing(s):
        raise RuntimeError("404 Subscription does not exist")

    ok, waiting, _, why = night.drain(procs, missing, timeout=5, quiet=0.2, alive=lambda: {"p"})
    assert not ok and waiting == {"s": None} and "cannot count s" in why


def test_final_counts_from_status_file_or_last_json_line(tmp_path):
    sf = tmp_path / "x.status.json"
    log = tmp_path / "x.log"
    log.write_text("=== 2026 starting: old\n{\"in\": 1}\n=== 2026 starting: new\nINFO ...\n{\"in\": 7, \"acked\": 7}\n")
    assert night.final_counts(log, str(sf)) == {"in": 7, "acked": 7}
    log.write_text("=== 2026 starting: old\n{\"in\": 1}\n=== 2026 starting: new\ncrashed\n")
    assert night.final_counts(log, str(sf)) is None  # never the previous run's counts
    procstatus.write(sf, {"state": "stopped", "counts": {"in": 9}})
    assert night.final_counts(log, str(sf)) == {"in": 9}


def test_status_writer(tmp_path):
    sf = tmp_path / "s.json"
    w = procstatus.StatusWriter("proc", lambda: {"in_flight": 0, "counts": {"in": 2}}, sf, every=0.05).start()
    assert procstatus.read(sf)["state"] == "running"
    w.stop()
    d = json.loads(sf.read_text())
    assert d["state"] == "stopped" and d["counts"] == {"in": 2} and d["process"] == "proc"
    assert procstatus.read(tmp_path / "nope.json") is None
