"""Synthetic alert generator: validity, determinism, realism per kind, files, topics, corruption."""

from __future__ import annotations

import datetime as dt
import io
import json
import re

import fastavro
import numpy as np
import pytest

from pgbctl import codec, schemamap, synth

ZTF_OBJECT_ID = re.compile(r"^ZTF\d{2}[a-z]{7}$")


def _decode_all(packets):
    return [codec.decode(p) for p in packets]


# ---- validity and determinism -------------------------------------------------------------


@pytest.mark.parametrize("survey,version", [("ztf", "3.3"), ("ztf", "3.5"), ("ztf", "4.02"), ("decat", "0.14")])
def test_packets_are_valid_single_record_containers(survey, version):
    packets = synth.generate(8, 5, survey=survey, schema_version=version, sn_model="bazin")
    assert len(packets) == 8
    smap = schemamap.load(survey)
    for p in packets:
        recs = list(fastavro.reader(io.BytesIO(p)))
        assert len(recs) == 1
        rec, ws = codec.decode_with_schema(p)
        assert codec.strict_schema_problems(ws) == []
        assert fastavro.validate(rec, fastavro.parse_schema(ws))
        assert codec.fix_schema_header(p) == p  # already fixed
        assert codec.schema_version(rec, smap, ws) == version
        assert ws.get("doc")
        assert schemamap.for_schema_name(codec.schema_fullname(ws)) == smap


def test_deterministic_bytes():
    a = synth.generate(12, 42, sn_model="bazin")
    b = synth.generate(12, 42, sn_model="bazin")
    assert a == b
    assert synth.generate(12, 43, sn_model="bazin") != a
    assert list(synth.iter_generate(12, 42, sn_model="bazin")) == a
    assert synth.generate(12, 42, kind="sn", sn_model="bazin") != a


def test_zero_and_argument_errors():
    assert synth.generate(0) == []
    with pytest.raises(ValueError, match="kind"):
        synth.generate(1, kind="comet")
    with pytest.raises(schemamap.SchemaMapError):
        synth.generate(1, survey="hubble")
    with pytest.raises(ValueError, match="no bundled Avro schema"):
        synth.generate(1, schema_version="9.9")
    with pytest.raises(ValueError, match="no bundled Avro schema"):
        synth.generate(1, survey="lsst")
    with pytest.raises(ValueError):
        synth.generate(-1)


# ---- realistic ZTF fields -------------------------------------------------------------------


def test_ztf_ids_and_fields(synthetic_ztf, ztf_map):
    recs = _decode_all(synthetic_ztf)
    candids = [r["candid"] for r in recs]
    assert all(len(str(c)) == 19 for c in candids)
    assert candids == sorted(candids) and len(set(candids)) == len(candids)
    assert all(r["candid"] == r["candidate"]["candid"] for r in recs)
    jds = [r["candidate"]["jd"] for r in recs]
    assert jds == sorted(jds)
    for r in recs:
        c = r["candidate"]
        assert ZTF_OBJECT_ID.match(r["objectId"]), r["objectId"]
        assert r["objectId"].startswith("ZTF26")
        assert c["fid"] in (1, 2, 3) and c["programid"] == 1
        assert 25.5 < c["magzpsci"] < 27 and 19 < c["diffmaglim"] < 21.5
        assert 12 < c["magpsf"] < 23 and 0 < c["sigmapsf"] < 1.1
        assert 0 <= c["ra"] < 360 and -30 <= c["dec"] <= 88
        assert c["isdiffpos"] in ("t", "f")
        for k in ("rb", "drb", "nbad", "fwhm", "elong", "magdiff", "distpsnr1", "sgscore1", "ssdistnr", "ndethist"):
            assert c[k] is not None, k
        assert c["ndethist"] >= 1
        for cut in ztf_map["cutouts"]["fields"]:
            stamp = r[cut]["stampData"]
            assert stamp[:2] == b"\x1f\x8b" and 1000 < len(stamp) < 10000
            assert r[cut]["fileName"].startswith(f"candid{r['candid']}")
        # previous detections have older, smaller candids
        for p in r["prv_candidates"] or []:
            assert p["jd"] < c["jd"]
            if p["candid"] is not None:
                assert p["candid"] < r["candid"] and p["magpsf"] is not None
            else:
                assert p["magpsf"] is None and p["diffmaglim"] is not None


def test_history_has_detections_and_upper_limits(ztf_map):
    recs = _decode_all(synth.generate(20, 3, kind="sn", sn_model="bazin"))
    longest = max(recs, key=lambda r: len(r["prv_candidates"] or []))
    prv = longest["prv_candidates"]
    assert any(p["candid"] is None for p in prv) and any(p["candid"] is not None for p in prv)
    lc = codec.light_curve(longest, ztf_map)
    assert (lc.source_id == -1).any() and lc.detected.sum() >= 3
    assert longest["candidate"]["ndethist"] == lc.detected.sum()
    assert all(max(lc.mjd) - t <= 30 for t in lc.mjd)


def test_cutout_bytes_makes_benchmark_sized_packets():
    small = synth.generate(2, 1, kind="asteroid")
    big = synth.generate(2, 1, kind="asteroid", cutout_bytes=15000)
    assert all(len(p) < 45000 for p in small)
    assert all(60000 < len(p) < 80000 for p in big)
    assert len(codec.decode(big[0])["cutoutScience"]["stampData"]) >= 15000


# ---- kinds ------------------------------------------------------------------------------------


def test_kind_artifact_fails_purity():
    for r in _decode_all(synth.generate(10, 2, kind="artifact")):
        c = r["candidate"]
        assert c["rb"] < 0.3 and c["drb"] < 0.2 and c["nbad"] > 0
        assert c["elong"] > 1.6 and abs(c["magdiff"]) > 0.35
        assert c["fwhm"] < 0.9 or c["fwhm"] > 4.9


def test_kind_asteroid():
    for r in _decode_all(synth.generate(6, 2, kind="asteroid")):
        c = r["candidate"]
        assert 0 <= c["ssdistnr"] <= 5 and c["ssnamenr"] not in (None, "null")
        assert c["ndethist"] == 1 and not r["prv_candidates"]
        assert c["rb"] > 0.6 and c["nbad"] == 0


def test_kind_star():
    for r in _decode_all(synth.generate(8, 2, kind="star")):
        c = r["candidate"]
        assert c["sgscore1"] >= 0.9 and c["distpsnr1"] < 0.5 and c["ssdistnr"] == -999.0


def test_kind_sn_rises_and_falls(ztf_map):
    recs = _decode_all(synth.generate(20, 9, kind="sn", sn_model="bazin"))
    by_obj = {}
    for r in recs:
        by_obj.setdefault(r["objectId"], []).append(r)
        c = r["candidate"]
        assert c["isdiffpos"] == "t" and c["rb"] > 0.6 and c["sgscore1"] < 0.3 and c["distpsnr1"] > 0.5
    oid, alerts = max(by_obj.items(), key=lambda kv: len(kv[1]))
    rows = {}
    for r in alerts:
        lc = codec.light_curve(r, ztf_map).detections()
        rows.update({int(s): (t, f, b) for s, t, f, b in zip(lc.source_id, lc.mjd, lc.mag, lc.band)})
    pts = sorted(rows.values())
    assert len(pts) >= 6
    band = max({b for *_, b in pts}, key=lambda x: sum(p[2] == x for p in pts))
    mags = [m for _, m, b in pts if b == band]
    k = int(np.argmin(mags))
    assert mags[k] < mags[0] - 0.3  # it brightened
    assert 0 < k or mags[-1] > mags[0]


def test_kind_variable_both_signs():
    recs = _decode_all(synth.generate(40, 4, kind="variable"))
    signs = {r["candidate"]["isdiffpos"] for r in recs}
    assert signs == {"t", "f"}


def _classify(c) -> str:
    if c["rb"] < 0.35:
        return "artifact"
    if 0 <= c["ssdistnr"] <= 5:
        return "asteroid"
    if c["sgscore1"] >= 0.9:
        return "star"
    return "sn-or-variable"


def test_mixed_has_every_kind():
    recs = _decode_all(synth.generate(80, 0))
    kinds = {_classify(r["candidate"]) for r in recs}
    assert kinds == {"artifact", "asteroid", "star", "sn-or-variable"}
    assert len({r["objectId"] for r in recs}) >= 10


def test_salt2_model_when_available(shared_data, monkeypatch):
    d = shared_data / "sncosmo"
    if not (d / "models/salt2/salt2-4").is_dir():
        pytest.skip("no SALT2 2.4 model in shared data")
    monkeypatch.setenv("SNCOSMO_DATA_DIR", str(d))
    a = synth.generate(8, 1, kind="sn", sn_model="salt2")
    assert a == synth.generate(8, 1, kind="sn", sn_model="salt2")
    assert a != synth.generate(8, 1, kind="sn", sn_model="bazin")
    for r in _decode_all(a):
        assert 14 < r["candidate"]["magpsf"] < 21.5


def test_salt2_required_but_missing(monkeypatch):
    monkeypatch.delenv("SNCOSMO_DATA_DIR", raising=False)
    with pytest.raises(RuntimeError, match="SNCOSMO_DATA_DIR"):
        synth.generate(2, 1, kind="sn", sn_model="salt2")
    assert synth.generate(2, 1, kind="sn", sn_model="auto") == synth.generate(2, 1, kind="sn", sn_model="bazin")


# ---- other versions and surveys ---------------------------------------------------------


def test_ztf_402_has_forced_photometry():
    recs = _decode_all(synth.generate(10, 1, schema_version="4.02", kind="sn", sn_model="bazin"))
    assert all(r["schemavsn"] == "4.02" for r in recs)
    last = recs[-1]
    assert last["fp_hists"] and all(f["forcediffimflux"] is not None for f in last["fp_hists"])
    assert len(last["fp_hists"]) >= len(last["prv_candidates"])


def test_bundled_402_schema_matches_shared(shared_data):
    """Our bundled 4.02 schema is ZTF's published one (5 files) with named types inlined."""
    base = shared_data / "ztf/schemas/4.02"
    if not (base / "alert.avsc").is_file():
        pytest.skip("no 4.02 schema in shared data")
    parts = {f"ztf.alert.{n}": json.loads((base / f"{n}.avsc").read_text())
             for n in ("cutout", "candidate", "prv_candidate", "fp_hist")}
    seen = set()

    def inline(t):
        if isinstance(t, str) and t in parts and t not in seen:
            seen.add(t)
            return inline(parts[t])
        if isinstance(t, list):
            return [inline(x) for x in t]
        if isinstance(t, dict):
            t = dict(t)
            if "fields" in t:
                t["fields"] = [dict(f, type=inline(f["type"])) for f in t["fields"]]
            if "items" in t:
                t["items"] = inline(t["items"])
        return t

    shared = inline(json.loads((base / "alert.avsc").read_text()))
    assert synth.bundled_schema("ztf", "4.02") == shared
    rec = codec.decode(synth.generate(3, 0, schema_version="4.02")[-1])
    assert fastavro.validate(rec, fastavro.parse_schema(shared))


def test_ztf_35_history_is_forced_photometry(ztf_map):
    recs = _decode_all(synth.generate(10, 1, schema_version="3.5", kind="sn", sn_model="bazin"))
    last = recs[-1]
    assert last["prv_candidates"] and "candid" not in last["prv_candidates"][0]
    lc = codec.light_curve(last, ztf_map)
    assert lc.detected.sum() == 1


def test_decat_packets(decat_map):
    recs = _decode_all(synth.generate(12, 3, survey="decat", sn_model="bazin"))
    for r in recs:
        assert re.match(r"^DC\d{2}[a-z]{4}$", r["objectid"])
        ts = r["triggersource"]
        assert isinstance(ts["scicutout"], bytes) and ts["scicutout"][:2] == b"\x1f\x8b"
        assert ts["sourceid"] == r["sources"][-1]["sourceid"]  # sources include the trigger
        assert all(s["scicutout"] is None for s in r["sources"])
        assert decat_map.generic_filter(ts["filter"]) in ("g", "r")
        assert r["ra"] == ts["ra"] and r["tdisc"].startswith("2026-")
        assert 59000 < ts["mjd"] < 70000 and 28 < ts["magzp"] < 30
    sids = [r["triggersource"]["sourceid"] for r in recs]
    assert sids == sorted(sids) and len(set(sids)) == len(sids)


# ---- files and topics -------------------------------------------------------------------


@pytest.mark.parametrize(
    "when,topic",
    [
        (2459458.7, "ztf_20210901_programid1"),
        (59458.2, "ztf_20210901_programid1"),
        (dt.date(2026, 1, 2), "ztf_20260102_programid1"),
        (dt.datetime(2026, 1, 2, 23, 59), "ztf_20260102_programid1"),
        ("20260102", "ztf_20260102_programid1"),
        ("2026-01-02", "ztf_20260102_programid1"),
    ],
)
def test_kafka_topic_for(when, topic, ztf_map):
    assert synth.kafka_topic_for(when, ztf_map) == topic
    assert synth.kafka_topic_for(when, "ztf") == topic


def test_kafka_topic_other_surveys():
    assert synth.kafka_topic_for("2021-04-14", "decat") == "decat_20210414_2021A-0113"
    assert synth.kafka_topic_for(60000.0, "lsst") == "alerts-simulated"
    with pytest.raises(ValueError):
        synth.kafka_topic_for("2021/04/14", "ztf")
    with pytest.raises(TypeError):
        synth.kafka_topic_for(None, "ztf")


def test_real_file_names_follow_the_convention(shared_data):
    """Archive files are named <objectId>.<sourceId>.<topic>.avro; we rebuild every such name."""
    named = [p for p in sorted(shared_data.rglob("*.avro")) if re.match(r"^(ZTF|DC)\d{2}[a-z]+\.\d+\.", p.name)]
    assert len(named) >= 80
    for p in named:
        data = p.read_bytes()
        smap = schemamap.for_schema_name(codec.schema_fullname(codec.header_schema(data)))
        assert synth.filename_for(codec.decode(data), smap) == p.name


def test_write_dir(tmp_path, ztf_map):
    paths = synth.write_dir(tmp_path / "alerts", 6, 8, sn_model="bazin")
    assert len(paths) == 6 and all(p.exists() for p in paths)
    for p in paths:
        oid, candid, topic, ext = p.name.split(".")
        rec = codec.decode(p.read_bytes())
        assert (oid, int(candid), ext) == (rec["objectId"], rec["candid"], "avro")
        assert topic == synth.kafka_topic_for(rec["candidate"]["jd"], ztf_map)
        assert re.match(r"^ztf_\d{8}_programid1$", topic)
    d = synth.write_dir(tmp_path / "decat", 2, 1, survey="decat")
    assert all(p.name.startswith("DC") and "decat_" in p.name for p in d)


# ---- corruption helpers -----------------------------------------------------------------


@pytest.mark.parametrize("how", synth.CORRUPTIONS)
def test_corrupt_variants(synthetic_ztf, how):
    good = synthetic_ztf[0]
    bad = synth.corrupt(good, how)
    assert isinstance(bad, bytes) and bad != good
    assert synth.corrupt(good, how) == bad  # deterministic


def test_corrupt_unknown():
    with pytest.raises(ValueError, match="unknown corruption"):
        synth.corrupt(b"", "melt")


def test_corrupt_decat_semantic(decat_map):
    p = synth.generate(1, 1, survey="decat")[0]
    rec = codec.decode(synth.corrupt(p, "nan_mag", "decat"))
    assert np.isnan(rec["triggersource"]["mag"])
    rec = codec.decode(synth.corrupt(p, "missing_field"))
    assert "mag" not in rec["triggersource"] and all("mag" not in s for s in rec["sources"])
    assert not codec.light_curve(rec, decat_map).detected.any()


def test_stream_blocks_never_reuse_ids(ztf_map, decat_map):
    import itertools

    first = list(itertools.islice(synth.stream(5, chunk=10, sn_model="bazin"), 40))
    assert first[:10] == synth.generate(10, 5, sn_model="bazin")
    assert first == list(itertools.islice(synth.stream(5, chunk=10, sn_model="bazin"), 40))
    ids = [codec.alert_ids(codec.decode(p), ztf_map) for p in first]
    assert len({sid for _, sid in ids}) == 40
    blocks = [{oid for oid, _ in ids[k:k + 10]} for k in range(0, 40, 10)]
    assert all(not (a & b) for a, b in itertools.combinations(blocks, 2))
    d = [codec.alert_ids(codec.decode(p), decat_map)[1]
         for p in itertools.islice(synth.stream(1, survey="decat", chunk=5), 15)]
    assert len(set(d)) == 15 and max(d) < 2**31
    with pytest.raises(ValueError):
        next(synth.stream(chunk=0))
