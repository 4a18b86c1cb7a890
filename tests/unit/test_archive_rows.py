"""The archive function's pure part, the warehouse row builders, and the handler over a fake CloudEvent."""

import base64
import json
import math

import pytest

from pgbctl import archive, codec, rows, schemamap, synth

DEAD = {"empty", "garbage", "bad_magic", "truncate", "truncate_header", "bad_sync", "zero_records",
        "two_records", "bad_schema_json", "wrong_schema"}


def test_object_name_and_metadata(sample):
    smap = schemamap.load(sample.survey)
    if "cutouts" not in smap.raw:
        pytest.skip("map without cutouts")
    p = archive.prepare(sample.data, {"kafka.topic": "ztf_20260402_programid1"}, smap, "m-1")
    oid, sid = codec.alert_ids(codec.decode(sample.data), smap)
    assert p.name == f"{oid}.{sid}.ztf_20260402_programid1.avro"
    assert p.metadata["objectId"] == str(oid) and p.metadata["candid"] == str(sid)
    assert p.metadata["pubsub.message_id"] == "m-1"
    assert {"ra", "dec", "kafka.topic"} <= set(p.metadata)
    # the stored bytes decode to the same values and carry a strict (null-first) schema
    assert codec.decode(p.data) == codec.decode(sample.data)
    assert codec.strict_schema_problems(codec.header_schema(p.data)) == []


@pytest.mark.parametrize("how", sorted(DEAD))
def test_bad_packets_raise_one_line_errors(how, synthetic_ztf, ztf_map):
    bad = synth.corrupt(synthetic_ztf[0], how, ztf_map)
    with pytest.raises(codec.AlertDecodeError) as e:
        archive.prepare(bad, {}, ztf_map)
    assert str(e.value) and "\n" not in str(e.value)


def test_nan_magnitude_is_archived_not_dead_lettered(synthetic_ztf, ztf_map):
    p = archive.prepare(synth.corrupt(synthetic_ztf[0], "nan_mag", ztf_map), {"kafka.topic": "t"}, ztf_map)
    assert p.name.endswith(".t.avro")


def test_alerts_row_has_no_cutouts_and_no_nan(synthetic_ztf, ztf_map):
    alert = codec.decode(synth.corrupt(synthetic_ztf[1], "nan_mag", ztf_map))
    row = rows.alerts_row(alert, ztf_map)
    assert not set(ztf_map["cutouts"]["fields"]) & set(row)
    assert row["candidate"]["magpsf"] is None  # NaN -> null
    json.dumps(row, allow_nan=False)  # BigQuery's JSON API cannot carry NaN


def test_diasource_row_is_flat_with_prv_ids(synthetic_ztf, ztf_map):
    alert = max((codec.decode(p) for p in synthetic_ztf), key=lambda a: len(a["prv_candidates"] or []))
    row = rows.diasource_row(alert, ztf_map)
    assert row["objectId"] == alert["objectId"] and row["candid"] == alert["candid"]
    assert row["magpsf"] == pytest.approx(alert["candidate"]["magpsf"])
    detections = [p["candid"] for p in alert["prv_candidates"] if p["candid"] is not None]
    assert row["prv_candids"] == detections and len(detections) < len(alert["prv_candidates"])
    assert not any(isinstance(v, dict) for v in row.values())


def test_diasource_rows_for_real_alerts(real_alert_path):
    if "lsst" in str(real_alert_path):
        pytest.skip("no DIASource template for lsst yet")
    smap = schemamap.load("decat" if "decat" in str(real_alert_path) else "ztf")
    alert = codec.decode(real_alert_path.read_bytes())
    row = rows.diasource_row(alert, smap)
    assert row["objectId"] == str(codec.alert_ids(alert, smap)[0])
    json.dumps(row, allow_nan=False)


def test_clean():
    assert rows.clean({"a": [math.nan, 1.0, b"\x00"], "b": math.inf}) == {"a": [None, 1.0, "AA=="], "b": None}


class _Blob:
    def __init__(self, store, name, metadata=None):
        self.store, self.name, self.metadata = store, name, metadata

    def upload_from_string(self, data, content_type=None, if_generation_match=None):
        from google.api_core import exceptions as gexc

        if if_generation_match == 0 and self.name in self.store:
            raise gexc.PreconditionFailed("exists")
        self.store[self.name] = (data, dict(self.metadata or {}))

    def patch(self):
        data, _ = self.store[self.name]
        self.store[self.name] = (data, dict(self.metadata or {}))


class _Storage:
    """Records uploads; honours if_generation_match=0 like the real service."""

    def __init__(self):
        self.objects = {}

    def bucket(self, name):
        s = self

        class B:
            def blob(self, path):
                return _Blob(s.objects, f"{name}/{path}")

            def get_blob(self, path):
                key = f"{name}/{path}"
                return _Blob(s.objects, key, dict(s.objects[key][1])) if key in s.objects else None

        return B()


def test_handler_over_fake_cloudevent(monkeypatch, synthetic_ztf, ztf_map):
    """The Cloud Function handler is a few lines over archive.handle: drive it with CloudEvents."""
    from cloudevents.http import CloudEvent

    from pgbctl import functions_runtime

    monkeypatch.setenv("PGBCTL_SURVEY", "ztf")
    monkeypatch.setenv("PGBCTL_TESTID", "t1")
    monkeypatch.setenv("GCP_PROJECT", "my-project")
    mod = functions_runtime.load_module("upload_bytes_to_bucket")
    handler, env = mod.run, mod.ENV
    storage = _Storage()
    published = []

    class Pub:
        def publish(self, topic, data, **attrs):
            published.append((topic, json.loads(data), attrs))

            class F:
                def result(self, timeout=None):
                    return "id"

            return F()

    monkeypatch.setattr(type(env), "clients", property(lambda self: type("C", (), {"storage": storage, "publisher": Pub()})()), raising=False)
    monkeypatch.setattr(type(env), "schema_map", property(lambda self: ztf_map), raising=False)

    def event(data, mid):
        return CloudEvent({"type": "google.cloud.pubsub.topic.v1.messagePublished", "source": "//x"},
                          {"message": {"data": base64.b64encode(data).decode(), "messageId": mid,
                                       "attributes": {"kafka.topic": "ztf_20260402_programid1"}}})

    assert handler(event(synthetic_ztf[0], "1")) == "stored"
    assert handler(event(synthetic_ztf[0], "1")) == "exists"  # redelivery: same object, once
    assert handler(event(b"not avro", "2")) == "dead_letter"
    buckets = {k.split("/", 1)[0] for k in storage.objects}
    assert buckets == {"my-project-ztf-alert_avros-t1", "my-project-ztf-dead_letter-t1"}
    (topic, rec, attrs), = published
    assert topic.endswith("/topics/ztf-dead_letter-t1") and rec["stage"] == "upload_bytes_to_bucket"
    assert "magic" in rec["reason"] or "Avro" in rec["reason"]
    (dl_key,) = [k for k in storage.objects if "dead_letter" in k]
    assert storage.objects[dl_key][1]["announced"] == "true" and storage.objects[dl_key][1]["reason"] == rec["reason"]
    # a redelivered dead letter is neither stored nor announced twice
    assert handler(event(b"not avro", "2")) == "dead_letter" and len(published) == 1


def test_dead_letter_announced_after_a_crash_between_store_and_publish(synthetic_ztf, ztf_map):
    """A dead letter stored but never announced (the process died before publishing) is
    announced on redelivery; one already announced is not published again."""
    storage = _Storage()
    published = []

    class Pub:
        def __init__(self, fail=False):
            self.fail = fail

        def publish(self, topic, data, **attrs):
            if self.fail:
                raise RuntimeError("publisher down")
            published.append(json.loads(data))
            return type("F", (), {"result": lambda self, timeout=None: "id"})()

    kw = dict(smap=ztf_map, storage=storage, bucket="b", dead_letter_bucket="dl", dead_letter_topic="t")
    with pytest.raises(RuntimeError):
        archive.handle(b"junk", {}, "m9", publisher=Pub(fail=True), **kw)
    assert len(storage.objects) == 1 and not published  # kept, not announced: the message is redelivered
    assert archive.handle(b"junk", {}, "m9", publisher=Pub(), **kw).status == "dead_letter"
    assert len(published) == 1 and published[0]["message_id"] == "m9"
    assert archive.handle(b"junk", {}, "m9", publisher=Pub(), **kw).status == "dead_letter"
    assert len(published) == 1


def test_unexpected_error_in_prepare_is_dead_lettered(monkeypatch, ztf_map):
    storage = _Storage()

    def boom(*a, **k):
        raise KeyError("weird")

    monkeypatch.setattr(archive, "prepare", boom)
    out = archive.handle(b"x", {}, "m1", smap=ztf_map, storage=storage, bucket="b", dead_letter_bucket="dl")
    assert out.status == "dead_letter" and "KeyError" in out.reason and "\n" not in out.reason
