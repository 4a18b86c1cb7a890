import pytest
from hypothesis import given, strategies as st

from pgbctl import naming
from pgbctl.naming import Instance, Kind, NameError_

words = st.from_regex(r"[a-z][a-z0-9]{0,7}", fullmatch=True).filter(
    lambda w: w not in {"false", "true", "none", "null", "nil", "prod", "production"}
)
testids = st.one_of(st.none(), words)
projects = st.from_regex(r"[a-z][a-z0-9]{5,12}", fullmatch=True)


def test_registry_is_unambiguous():
    assert naming.check_unambiguous() == []


@given(survey=words, testid=testids, project=projects)
def test_parse_inverts_format_for_every_kind(survey, testid, project):
    inst = Instance(survey, testid, project)
    for kind, stubs in naming.STUBS.items():
        if kind is Kind.table:
            continue
        for stub in stubs:
            try:
                name = naming.fmt(kind, stub, inst)
            except NameError_:
                continue  # too long for this kind; fmt refuses rather than truncating
            assert naming.parse(kind, name, project=project) == (stub, inst)


@pytest.mark.parametrize(
    "kind,stub,testid,expected",
    [
        (Kind.topic, "alerts", "x", "ztf-alerts-x"),
        (Kind.topic, "alerts", None, "ztf-alerts"),
        (Kind.subscription, "alerts-counter", "x", "ztf-alerts-counter-x"),
        (Kind.subscription, "alerts-reservoir", None, "ztf-alerts-reservoir"),
        (Kind.bucket, "alert_avros", "x", "my-proj-ztf-alert_avros-x"),
        (Kind.dataset, "alerts", "x", "ztf_alerts_x"),
        (Kind.dataset, "alerts", None, "ztf_alerts"),
        (Kind.vm, "night-conductor", "x", "ztf-night-conductor-x"),
        (Kind.beam_job, "bq-sink", None, "ztf-bq-sink"),
    ],
)
def test_examples(kind, stub, testid, expected):
    assert naming.fmt(kind, stub, Instance("ztf", testid, "my-proj")) == expected


def test_production_subscription_is_not_read_as_testid():
    stub, inst = naming.parse(Kind.subscription, "ztf-alerts-counter")
    assert stub == "alerts-counter" and inst.testid is None


@pytest.mark.parametrize("bad", ["False", "false", "True", "None", "x-y", "x_y", "1abc", "Abc", "a" * 21, "prod"])
def test_bad_testids_refused(bad):
    with pytest.raises(NameError_):
        Instance("ztf", bad)


def test_false_is_never_production():
    with pytest.raises(NameError_, match="reserved"):
        naming.validate_testid("False")
    with pytest.raises(NameError_):
        naming.validate_testid(False)  # the boolean itself
    assert naming.validate_testid("") is None and naming.validate_testid(None) is None


def test_bucket_name_length_is_checked():
    inst = Instance("ztf", "abcdefghijklmnopqrst", "a-very-long-project-id-29chars")
    with pytest.raises(NameError_, match="63"):
        inst.bucket("broker_files")


def test_foreign_names_do_not_parse():
    for name in ["ztf-unknown-x", "ztf", "alerts", "ztf-alerts-X", "ztf-alerts-x-y"]:
        with pytest.raises(NameError_):
            naming.parse(Kind.topic, name)
    with pytest.raises(NameError_):
        naming.parse(Kind.bucket, "other-proj-ztf-alert_avros-x", project="my-proj")


def test_table_is_fully_qualified():
    assert Instance("ztf", "x", "my-proj").table("DIASource") == "my-proj.ztf_alerts_x.DIASource"
