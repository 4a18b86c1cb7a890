from pgbctl import naming
from pgbctl.naming import Instance
from pgbctl.plan import Action, RKind, desired, plan, plan_delete, resource

INST = Instance("ztf", "x", "my-proj")
SCHEMAS = {t: f'[{{"name":"{t}"}}]' for t in naming.TABLES}
FILES = {"schema_maps/ztf.yaml": b"SURVEY: ztf\n", "templates/a.json": b"{}"}


def want():
    return desired(INST, table_schemas=SCHEMAS, broker_files=FILES)


def test_desired_covers_every_stub():
    names = {r.name for r in want()}
    for t in naming.TOPICS:
        assert INST.topic(t) in names
    for s in naming.SUBSCRIPTIONS:
        assert INST.subscription(s) in names
    for b in naming.BUCKETS:
        assert INST.bucket(b) in names
    assert "my-proj-ztf-broker_files-x/schema_maps/ztf.yaml" in names


def test_subscriptions_attach_to_their_topic():
    subs = {r.name: r.specd()["topic"] for r in want() if r.kind is RKind.subscription}
    assert subs["ztf-alerts-counter-x"] == "ztf-alerts-x"
    assert subs["ztf-alerts-reservoir-x"] == "ztf-alerts-x"
    assert subs["ztf-alert_avros-counter-x"] == "ztf-alert_avros-x"


def test_empty_observed_creates_everything_in_dependency_order():
    p = plan(want(), [])
    assert len(p) == len(want()) and all(c.action is Action.create for c in p.changes)
    kinds = [c.resource.kind for c in p.changes]
    assert kinds.index(RKind.subscription) > max(i for i, k in enumerate(kinds) if k is RKind.topic)
    assert kinds.index(RKind.object) > max(i for i, k in enumerate(kinds) if k is RKind.bucket)
    assert kinds.index(RKind.table) > kinds.index(RKind.dataset)


def test_rerun_is_a_noop():
    p = plan(want(), want())
    assert not p and len(p.unchanged) == len(want())


def test_changed_file_is_an_update_and_moved_subscription_a_replace():
    observed = list(want())
    observed = [
        resource(RKind.object, r.name, md5="old") if r.name.endswith("ztf.yaml")
        else resource(RKind.subscription, r.name, topic="ztf-other-x") if r.name == "ztf-alerts-counter-x"
        else r
        for r in observed
    ]
    p = plan(want(), observed)
    actions = {c.resource.name: c.action for c in p.changes}
    assert actions == {
        "my-proj-ztf-broker_files-x/schema_maps/ztf.yaml": Action.update,
        "ztf-alerts-counter-x": Action.replace,
    }
    assert "md5: old ->" in [c for c in p.changes if c.action is Action.update][0].reason


def test_extra_resources_left_alone_unless_pruned():
    extra = resource(RKind.topic, "ztf-alerts_old-x")
    assert not plan(want(), want() + [extra])
    p = plan(want(), want() + [extra], prune=True)
    assert [(c.action, c.resource) for c in p.changes] == [(Action.delete, extra)]


def test_delete_plan_reverses_dependency_order():
    p = plan_delete(want())
    kinds = [c.resource.kind for c in p.changes]
    assert all(c.action is Action.delete for c in p.changes)
    assert kinds.index(RKind.topic) > max(i for i, k in enumerate(kinds) if k is RKind.subscription)
    assert kinds.index(RKind.bucket) > max(i for i, k in enumerate(kinds) if k is RKind.object)
    assert kinds.index(RKind.dataset) > max(i for i, k in enumerate(kinds) if k is RKind.table)


def test_plan_serialises():
    d = plan(want(), []).as_dict()
    assert d["summary"]["create"] == len(want())
    assert {"action", "kind", "name", "reason", "spec"} <= set(d["changes"][0])
