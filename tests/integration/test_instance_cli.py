"""create → status → delete through the real CLI against the real local emulators."""

from __future__ import annotations

import json
import uuid

import pytest

from pgbctl.naming import BUCKETS, SUBSCRIPTIONS, TABLES, TOPICS, Instance
from itest_helpers import cli

pytestmark = pytest.mark.integration

@pytest.fixture()
def testid(local_services):
    t = "t" + uuid.uuid4().hex[:8]
    yield t
    cli("delete", "--testid", t, "--yes")  # tidy even if the test failed


def _resources(status_json: str) -> dict[tuple[str, str], dict]:
    st = json.loads(status_json)
    return {(r["kind"], r["name"]): r for r in st["resources"]}


def test_create_status_delete_round_trip(testid):
    inst = Instance("ztf", testid, "pgbctl-local")
    n_expected = len(TOPICS) + len(SUBSCRIPTIONS) + len(BUCKETS) + 1 + len(TABLES)

    # dry run: a plan, nothing created
    code, out, _ = cli("create", "--testid", testid, "--dry-run", "--json")
    assert code == 0
    p = json.loads(out)
    assert p["dry_run"] is True and p["summary"]["create"] >= n_expected
    code, _, err = cli("status", "--testid", testid, "--json")
    assert code == 1 and "does not exist" in err

    # create, then re-run: nothing to do
    code, out, err = cli("create", "--testid", testid, "--yes", "--json")
    assert code == 0, err
    created = json.loads(out)["summary"]["create"]
    code, out, err = cli("create", "--testid", testid, "--json")
    assert code == 0 and json.loads(out)["summary"]["create"] == 0
    assert json.loads(out)["summary"]["unchanged"] == created
    assert "up to date" in err

    # status: every resource exists, counts present, notification wired
    code, out, err = cli("status", "--testid", testid, "--json")
    assert code == 0, err
    res = _resources(out)
    for stub in TOPICS:
        assert res[("topic", inst.topic(stub))]["exists"]
    for stub in SUBSCRIPTIONS:
        r = res[("subscription", inst.subscription(stub))]
        assert r["exists"] and r["detail"]["waiting"] == 0
    for stub in BUCKETS:
        assert res[("bucket", inst.bucket(stub))]["exists"]
    assert res[("bucket", inst.bucket("broker_files"))]["detail"]["objects"] >= 3  # schema map + templates
    for stub in TABLES:
        r = res[("table", inst.table(stub))]
        assert r["exists"] and r["detail"]["rows"] == 0
    st = json.loads(out)
    assert {s["name"] for s in st["services"]} == {"pubsub", "storage", "warehouse"}
    assert st["reconcile"]["alerts published (alerts-counter)"] == 0

    # the table shape a human sees
    code, out, _ = cli("status", "--testid", testid)
    assert code == 0 and inst.topic("alerts") in out and "alerts per stage" in out

    # delete, then re-run: nothing to delete; status says it is gone
    code, out, err = cli("delete", "--testid", testid, "--yes", "--json")
    assert code == 0, err
    assert json.loads(out)["summary"]["delete"] >= n_expected
    code, out, err = cli("delete", "--testid", testid, "--yes", "--json")
    assert code == 0 and json.loads(out)["summary"]["delete"] == 0
    code, _, err = cli("status", "--testid", testid)
    assert code == 1


def test_published_alerts_are_counted(testid):
    from pgbctl import synth

    inst = Instance("ztf", testid, "pgbctl-local")
    assert cli("create", "--testid", testid, "--yes")[0] == 0
    code, out, err = cli("simulate", "--testid", testid, "--synthetic", "--count", "7", "--rate", "max", "--json")
    assert code == 0, err
    assert json.loads(out)["published"] == 7
    code, out, _ = cli("status", "--testid", testid, "--json")
    res = _resources(out)
    assert res[("subscription", inst.subscription("alerts-counter"))]["detail"]["waiting"] == 7
    assert res[("subscription", inst.subscription("alerts-reservoir"))]["detail"]["waiting"] == 7
    # counting is non-destructive
    code, out, _ = cli("status", "--testid", testid, "--json")
    assert _resources(out)[("subscription", inst.subscription("alerts-counter"))]["detail"]["waiting"] == 7
    assert synth  # generator importable without ../shared


def test_production_delete_is_refused(local_services):
    code, _, err = cli("delete", "--survey", "ztf", "--yes")
    assert code == 2 and "PRODUCTION" in err and "--delete-production ztf" in err
    # the wrong survey name in the override is refused too
    code, _, err = cli("delete", "--survey", "ztf", "--yes", "--delete-production", "decat")
    assert code == 2


@pytest.mark.parametrize("bad", ["False", "false", "x-y", "Prod", "1abc"])
def test_bad_testid_is_a_usage_error(bad):
    code, _, err = cli("create", "--testid", bad, "--dry-run")
    assert code == 2 and "testid" in err.lower()


def test_decat_instance_plans_its_own_schema(local_services):
    code, out, err = cli("create", "--survey", "decat", "--testid", "plan", "--dry-run", "--json")
    assert code == 0, err
    names = [c["name"] for c in json.loads(out)["changes"]]
    assert any("decat-alerts-plan" == n for n in names)
    assert any(n.endswith("decat_alerts_plan.DIASource") for n in names)
    assert any("schema_maps/decat.yaml" in n for n in names)
