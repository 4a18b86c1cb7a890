"""Codec: decoding, errors, cutout stripping, the schema-header fix, photometry, light curves."""

from __future__ import annotations

import io
import json
import math

import fastavro
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgbctl import codec, schemamap, synth
from pgbctl.codec import AlertDecodeError


def same(a, b) -> bool:
    """Deep equality that treats NaN == NaN and requires equal types."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def fastavro_read(data: bytes) -> tuple[list, dict]:
    r = fastavro.reader(io.BytesIO(data))
    return list(r), json.loads(r.metadata["avro.schema"])


# =============================================================================================
# decoding, per sample (one per survey / schema version; real when present, synthetic always)
# =============================================================================================


def test_decode_sample(sample):
    smap = schemamap.load(sample.survey)
    rec, ws = codec.decode_with_schema(sample.data)
    assert same(rec, fastavro_read(sample.data)[0][0])
    assert codec.decode(sample.data).keys() == rec.keys()
    assert schemamap.for_schema_name(codec.schema_fullname(ws)).survey == sample.survey
    assert codec.schema_version(rec, smap, ws) == sample.version
    oid, sid = codec.alert_ids(rec, smap)
    assert oid is not None and sid is not None
    assert codec.header_schema(sample.data) == ws


def test_schema_version_sources(ztf_map, decat_map, lsst_map):
    assert codec.schema_version({"schemavsn": "3.3"}, ztf_map) == "3.3"
    assert codec.schema_version({}, ztf_map) is None
    assert codec.schema_version({}, decat_map, {"name": "object", "namespace": "decat", "version": "0.14"}) == "0.14"
    assert codec.schema_version({}, lsst_map, {"name": "alert", "namespace": "lsst.v10_0"}) == "10.0"


def test_get_path():
    rec = {"a": {"b": {"c": 1}}, "n": None}
    assert codec.get_path(rec, "a.b.c") == 1
    assert codec.get_path(rec, "a.x.c", "d") == "d"
    assert codec.get_path(rec, "n.x") is None
    assert codec.get_path(rec, ["n", "a.b.c"]) == 1


# =============================================================================================
# errors: one-line messages that say what is wrong
# =============================================================================================


@pytest.mark.parametrize(
    "how,needle",
    [
        ("empty", "not an Avro container: empty payload"),
        ("garbage", "not an Avro container: bad magic"),
        ("bad_magic", "not an Avro container: bad magic"),
        ("truncate", "truncated/corrupt Avro block"),
        ("truncate_header", "truncated"),
        ("bad_sync", "sync marker mismatch"),
        ("zero_records", "Avro container holds 0 records, expected exactly 1"),
        ("two_records", "Avro container holds 2 records, expected exactly 1"),
        ("bad_schema_json", "invalid writer schema in Avro header"),
    ],
)
def test_decode_errors(synthetic_ztf, how, needle):
    bad = synth.corrupt(synthetic_ztf[0], how)
    with pytest.raises(AlertDecodeError) as e:
        codec.decode(bad)
    msg = str(e.value)
    assert needle in msg
    assert "\n" not in msg and len(msg) < 300
    assert isinstance(e.value, ValueError)


def test_decode_rejects_non_bytes():
    with pytest.raises(AlertDecodeError, match="expected bytes"):
        codec.decode("Obj\x01")  # type: ignore[arg-type]


def test_corrupt_record_body_is_reported(synthetic_ztf):
    data = bytearray(synthetic_ztf[0])
    c = codec._parse_container(bytes(data))
    _, start, end = c.blocks[0]
    # declare a huge string length at the start of the record body: the first field is a string
    data[start:start + 1] = b"\x7e"
    with pytest.raises(AlertDecodeError, match="truncated/corrupt Avro block"):
        codec.decode(bytes(data))


def test_deflate_container_round_trip(synthetic_ztf):
    rec, ws = codec.decode_with_schema(synthetic_ztf[0])
    packed = codec.encode(rec, ws, codec="deflate", sync=b"0123456789abcdef")
    assert codec.header_metadata(packed)["avro.codec"] == b"deflate"
    assert same(codec.decode(packed), rec)
    assert same(fastavro_read(packed)[0][0], rec)


def test_wrong_schema_decodes_but_is_no_alert(synthetic_ztf, ztf_map):
    bad = synth.corrupt(synthetic_ztf[0], "wrong_schema")
    rec, ws = codec.decode_with_schema(bad)
    assert rec == {"id": 42, "note": "not an alert packet"}
    with pytest.raises(schemamap.SchemaMapError):
        schemamap.for_schema_name(codec.schema_fullname(ws))
    lc = codec.light_curve(rec, ztf_map)  # never raises
    assert len(lc) == 0 and lc.object_id is None


@pytest.mark.parametrize("how", ["nan_mag", "missing_field"])
def test_semantic_corruptions_make_non_detections(synthetic_ztf, ztf_map, how):
    good = codec.light_curve(codec.decode(synthetic_ztf[0]), ztf_map)
    bad = codec.decode(synth.corrupt(synthetic_ztf[0], how))
    lc = codec.light_curve(bad, ztf_map)
    cur = lc.source_id == lc.source_id_current
    assert cur.sum() == 1
    assert not lc.detected[cur].any()
    assert good.detected[good.source_id == good.source_id_current].all()


# =============================================================================================
# strip_cutouts
# =============================================================================================


def _cutout_holders(rec, smap):
    cut = smap["cutouts"]
    if cut["location"] == "alert":
        return [rec]
    return [codec.source_record(rec, smap)] + codec.prv_records(rec, smap)


@pytest.mark.parametrize("mode", ["drop", "null"])
def test_strip_cutouts(sample, mode):
    smap = schemamap.load(sample.survey)
    rec, ws = codec.decode_with_schema(sample.data)
    before = codec.decode(sample.data)
    out = codec.strip_cutouts(rec, smap, mode=mode)
    assert same(rec, before), "input must be untouched"
    names = smap["cutouts"]["fields"]
    for holder in _cutout_holders(out, smap):
        for n in names:
            if mode == "drop":
                assert n not in holder
            else:
                assert holder[n] is None
    # nothing else changed
    assert same(codec.strip_cutouts(out, smap, mode=mode), out)
    assert set(rec) - set(out) <= set(names)
    assert same(codec.light_curve(out, smap).mjd.tolist(), codec.light_curve(rec, smap).mjd.tolist())
    if mode == "null":  # still valid for the writer schema, and much smaller
        parsed = fastavro.parse_schema(ws, _ignore_default_error=True)
        assert fastavro.validate(out, parsed)
        assert len(codec.encode(out, ws, sync=b"s" * 16)) < len(sample.data) or sample.survey == "lsst"


def test_strip_cutouts_removes_the_bytes(synthetic_ztf, ztf_map):
    rec = codec.decode(synthetic_ztf[0])
    assert isinstance(rec["cutoutScience"]["stampData"], bytes)
    out = codec.strip_cutouts(rec, ztf_map)
    assert "cutoutScience" not in out and "cutoutScience" in rec
    assert out["candidate"] == rec["candidate"] and out["candidate"] is not rec["candidate"]
    with pytest.raises(ValueError):
        codec.strip_cutouts(rec, ztf_map, mode="zap")


def test_strip_cutouts_nested_decat(decat_map):
    pk = synth.generate(6, 2, survey="decat", sn_model="bazin")
    rec = codec.decode(pk[-1])
    assert isinstance(rec["triggersource"]["scicutout"], bytes)
    out = codec.strip_cutouts(rec, decat_map)
    for r in [out["triggersource"], *out["sources"]]:
        assert not {"scicutout", "refcutout", "diffcutout"} & set(r)
    assert isinstance(rec["triggersource"]["scicutout"], bytes)


# =============================================================================================
# the schema header fix
# =============================================================================================


def test_fix_header_every_real_alert(real_alert_path):
    data = real_alert_path.read_bytes()
    smap = schemamap.for_schema_name(codec.schema_fullname(codec.header_schema(data)))
    fixed = codec.fix_schema_header(data, smap)
    recs0, s0 = fastavro_read(data)
    recs1, s1 = fastavro_read(fixed)
    assert len(recs0) == len(recs1) == 1
    assert same(recs0[0], recs1[0]), "values must be identical after the fix"
    assert codec.strict_schema_problems(s1) == []
    fastavro.parse_schema(s1)  # strict parse (defaults checked)
    try:
        import avro.schema
    except ImportError:  # optional: the `avro` package (Apache's pure-Python reader)
        pass
    else:
        avro.schema.parse(json.dumps(s1))
    assert codec.fix_schema_header(fixed, smap) == fixed, "idempotent"
    if smap.get("SCHEMA_DOC"):
        assert s1.get("doc")
    c0, c1 = codec._parse_container(data), codec._parse_container(fixed)
    assert c1.sync == c0.sync and c1.codec == c0.codec
    _, reordered = codec.fix_schema(s0)
    if not reordered:  # no union changed order: data blocks are byte-for-byte the same
        assert fixed[c1.header_end:] == data[c0.header_end:]


def _original_header(shared_data):
    return (shared_data / "ztf/alerts/ztf_3.3_1154308030015010004.avro").read_bytes()


def test_original_ztf_header_is_invalid_and_gets_reordered(shared_data, ztf_map):
    data = _original_header(shared_data)
    s0 = codec.header_schema(data)
    probs = codec.strict_schema_problems(s0)
    assert any("candidate.diffmaglim" in p for p in probs) and len(probs) > 100
    fixed = codec.fix_schema_header(data, ztf_map)
    s1 = codec.header_schema(fixed)
    cand = {f["name"]: f for f in s1["fields"][4]["type"]["fields"]}
    assert cand["diffmaglim"]["type"] == ["null", "float"] and cand["diffmaglim"]["default"] is None
    assert cand["tooflag"]["type"] == ["int", "null"] and cand["tooflag"]["default"] == 0  # valid: kept
    # the union index is part of the encoding, so the data had to be re-encoded ...
    c0, c1 = codec._parse_container(data), codec._parse_container(fixed)
    assert fixed[c1.header_end:] != data[c0.header_end:]
    # ... to exactly the same values, also as read by the `avro` library when installed
    assert same(fastavro_read(fixed)[0][0], fastavro_read(data)[0][0])
    avro_datafile = pytest.importorskip("avro.datafile")
    import avro.io

    with avro_datafile.DataFileReader(io.BytesIO(fixed), avro.io.DatumReader()) as r:
        via_avro = list(r)
    assert same(via_avro[0], fastavro_read(data)[0][0])


def test_fix_header_reorder_false_keeps_data_bytes(shared_data):
    data = _original_header(shared_data)
    fixed = codec.fix_schema_header(data, reorder=False)
    s1 = codec.header_schema(fixed)
    assert codec.strict_schema_problems(s1) == []
    c0, c1 = codec._parse_container(data), codec._parse_container(fixed)
    assert fixed[c1.header_end:] == data[c0.header_end:]
    cand = {f["name"]: f for f in s1["fields"][4]["type"]["fields"]}
    assert cand["diffmaglim"]["type"] == ["float", "null"] and "default" not in cand["diffmaglim"]
    assert same(fastavro_read(fixed)[0][0], fastavro_read(data)[0][0])


def test_fix_header_restores_doc_with_identical_data(shared_data, ztf_map):
    data = (shared_data / "ztf/alerts/ztf_3.3_validschema_1154446891615015011.avro").read_bytes()
    assert "doc" not in codec.header_schema(data)
    for fixed in (codec.fix_schema_header(data, ztf_map), codec.fix_schema_header(data)):
        assert codec.header_schema(fixed)["doc"] == ztf_map["SCHEMA_DOC"]
        c0, c1 = codec._parse_container(data), codec._parse_container(fixed)
        assert fixed[c1.header_end:] == data[c0.header_end:]


def _no_docs(x):
    if isinstance(x, dict):
        return {k: _no_docs(v) for k, v in x.items() if k != "doc"}
    if isinstance(x, list):
        return [_no_docs(v) for v in x]
    return x


def test_fixed_header_matches_the_brokers_fixed_alerts(shared_data):
    """Our fix of ZTF's original 3.3 header equals the header of the already-fixed archive
    alerts (modulo nested docs, which those lost)."""
    ours = codec.header_schema(codec.fix_schema_header(_original_header(shared_data)))
    theirs = codec.header_schema(
        (shared_data / "ztf/alerts/ZTF18aamyaaj.1704217901015015001.ztf_20210901_programid1.avro").read_bytes())
    assert _no_docs(fastavro.parse_schema(ours)) == _no_docs(fastavro.parse_schema(theirs))


def test_fix_schema_unit():
    s = {"type": "record", "name": "r", "fields": [
        {"name": "a", "type": ["float", "null"], "default": None},
        {"name": "b", "type": ["string", "null"]},
        {"name": "c", "type": ["null", "int"], "default": 3},
        {"name": "d", "type": ["int", "null"], "default": 0},
        {"name": "e", "type": {"type": "array", "items": {"type": "record", "name": "s", "fields": [
            {"name": "x", "type": ["double", "null"], "default": None}]}}},
    ]}
    assert len(codec.strict_schema_problems(s)) == 3
    fixed, reordered = codec.fix_schema(s, doc="hello")
    assert reordered and fixed["doc"] == "hello"
    types = {f["name"]: f["type"] for f in fixed["fields"]}
    assert types["a"] == ["null", "float"] and types["b"] == ["null", "string"]
    assert types["c"] == ["int", "null"] and types["d"] == ["int", "null"]
    assert types["e"]["items"]["fields"][0]["type"] == ["null", "double"]
    assert codec.strict_schema_problems(fixed) == []
    assert s["fields"][0]["type"] == ["float", "null"], "input untouched"
    kept, reordered = codec.fix_schema(s, reorder=False)
    assert not reordered and codec.strict_schema_problems(kept) == []
    assert [f["type"] for f in kept["fields"]][:4] == [f["type"] for f in s["fields"]][:4]


def test_fix_header_synthetic_is_identity(synthetic_ztf):
    for p in synthetic_ztf[:3]:
        assert codec.fix_schema_header(p) == p
        assert codec.strict_schema_problems(codec.header_schema(p)) == []


def test_fix_header_reencode_synthetic_with_ztf_original_order(synthetic_ztf, ztf_map):
    """Re-create ZTF's broken header on a synthetic packet, then fix it: same values back."""
    rec, ws = codec.decode_with_schema(synthetic_ztf[-1])
    broken = json.loads(json.dumps(ws))

    def flip(t):
        if isinstance(t, dict):
            for f in t.get("fields", []):
                if isinstance(f["type"], list) and f["type"][0] == "null" and f.get("default", None) is None:
                    f["type"] = f["type"][1:] + ["null"]
                flip(f["type"])
            if t.get("type") == "array":
                flip(t["items"])
        elif isinstance(t, list):
            for b in t:
                flip(b)

    flip(broken)
    data = codec.encode(rec, broken, sync=b"x" * 16)
    assert codec.strict_schema_problems(broken)
    fixed = codec.fix_schema_header(data, ztf_map)
    assert codec.strict_schema_problems(codec.header_schema(fixed)) == []
    assert same(codec.decode(fixed), rec)


# =============================================================================================
# photometry
# =============================================================================================


def test_mag_to_flux_uses_ln10_over_2p5():
    flux, err = codec.mag_to_flux(20.0, 20.0, 0.1)
    assert flux == pytest.approx(1.0)
    assert err == pytest.approx(0.1 * math.log(10) / 2.5)  # 0.0921
    assert err == pytest.approx(0.0921034, rel=1e-6)
    assert err != pytest.approx(0.1 * math.log(10 / 2.5))  # the old bug: 0.1386
    assert "ln(10/2.5)" in codec.mag_to_flux.__doc__.replace(" ", "") or "ln(10 / 2.5)" in codec.mag_to_flux.__doc__
    f2, _ = codec.mag_to_flux(22.5, 25.0, 0.0)
    assert f2 == pytest.approx(10.0)


def test_mag_to_flux_vectorised_and_nan():
    mag = np.array([18.0, np.nan, 20.0])
    flux, err = codec.mag_to_flux(mag, np.array([26.0, 26.0, 26.0]), np.array([0.05, 0.1, np.nan]))
    assert flux.shape == err.shape == (3,)
    assert np.isnan(flux[1]) and np.isnan(err[1]) and np.isnan(err[2]) and np.isfinite(flux[2])
    assert flux[0] == pytest.approx(10 ** (0.4 * 8))
    flux_b, _ = codec.mag_to_flux(mag, 26.0, 0.1)  # broadcasting scalars
    assert np.allclose(flux_b[[0, 2]], flux[[0, 2]])


@settings(max_examples=60, deadline=None)
@given(st.floats(5, 30), st.floats(20, 35), st.floats(0.001, 1))
def test_flux_mag_round_trip(mag, zp, magerr):
    f, fe = codec.mag_to_flux(mag, zp, magerr)
    m, me = codec.flux_to_mag(f, fe, zp)
    assert m == pytest.approx(mag, abs=1e-9)
    assert me == pytest.approx(magerr, rel=1e-9)


def test_flux_to_mag_nonpositive_is_nan():
    m, me = codec.flux_to_mag(np.array([-5.0, 0.0, 100.0]), np.array([1.0, 1.0, 1.0]), 25.0)
    assert np.isnan(m[:2]).all() and m[2] == pytest.approx(20.0)


# =============================================================================================
# light curves
# =============================================================================================


def test_light_curve_invariants(sample):
    smap = schemamap.load(sample.survey)
    rec = codec.decode(sample.data)
    lc = codec.light_curve(rec, smap)
    n = len(lc)
    assert n >= 1
    for a in codec._LC_ARRAYS:
        assert len(getattr(lc, a)) == n
    assert lc.mjd.dtype == np.float64 and np.all(np.diff(lc.mjd) >= 0)
    assert 50000 < lc.mjd.min() < 70000
    assert lc.object_id == codec.alert_ids(rec, smap)[0]
    assert lc.source_id_current in set(lc.source_id.tolist())
    assert set(lc.band.tolist()) <= set(smap["SNCOSMO_BANDS"].values()) | {""}
    assert set(lc.zpsys.tolist()) == {"ab"}
    det = lc.detections()
    assert det.detected.all() and np.isfinite(det.flux).all() and np.isfinite(det.mag).all()
    assert np.isnan(det.limmag).all()
    ul = lc.select(~lc.detected)
    assert not ul.isdiffpos.any()
    if smap["upper_limit"]:
        nulls = [r for r in codec.prv_records(rec, smap) if r.get(smap["sourceId"]) is None]
        assert (lc.source_id == -1).sum() == len(nulls)
        assert np.isfinite(lc.limmag[lc.source_id == -1]).sum() == sum(
            r.get(smap["upper_limit"]["limmag"]) is not None for r in nulls)
    t = lc.to_astropy()
    assert t.colnames == ["time", "band", "flux", "fluxerr", "zp", "zpsys"]
    assert len(t) == n and len(lc.to_astropy(detections_only=True)) == len(det)
    with pytest.raises(ValueError):
        lc.mjd[0] = 1.0  # read-only arrays


def test_light_curve_ztf_real_counts(shared_data, ztf_map):
    rec = codec.decode(_original_header(shared_data))
    lc = codec.light_curve(rec, ztf_map)
    assert len(lc) == 26 and lc.detected.sum() == 1 and (lc.source_id == -1).sum() == 25
    cur = lc.source_id == rec["candid"]
    assert lc.mjd[cur][0] == pytest.approx(rec["candidate"]["jd"] - 2400000.5)
    assert lc.isdiffpos[cur][0] == (rec["candidate"]["isdiffpos"] in ("t", "1"))
    f, fe = codec.mag_to_flux(rec["candidate"]["magpsf"], rec["candidate"]["magzpsci"], rec["candidate"]["sigmapsf"])
    assert lc.flux[cur][0] == pytest.approx(f) and lc.fluxerr[cur][0] == pytest.approx(fe)


def test_light_curve_snia_rises_and_falls(shared_data, ztf_map):
    """The 34 alerts of ZTF21abiuvdk, merged by source id, show a rise and a fall in g and r."""
    rows = {}
    for p in sorted((shared_data / "ztf/ZTF21abiuvdk").glob("*.avro")):
        lc = codec.light_curve(codec.decode(p.read_bytes()), ztf_map).detections()
        rows.update({int(s): (t, b, f) for s, t, b, f in zip(lc.source_id, lc.mjd, lc.band, lc.flux)})
    assert len(rows) >= 30
    for band in ("ztfg", "ztfr"):
        flux = [f for _, b, f in sorted(rows.values()) if b == band]
        k = int(np.argmax(flux))
        assert 0 < k < len(flux) - 1
        assert flux[k] > 5 * flux[0] and flux[k] > 5 * flux[-1]


def test_light_curve_decat_dedupes_trigger(shared_data, decat_map):
    rec = codec.decode((shared_data / "decat/DC21baaa.570349.decat_20210414_2021A-0113.avro").read_bytes())
    lc = codec.light_curve(rec, decat_map)
    assert len(lc) == len(rec["sources"]) == 14  # trigger is also in `sources`
    assert len(set(lc.source_id.tolist())) == 14
    assert set(lc.band.tolist()) == {"desg", "desr"} and lc.detected.all()
    assert lc.mjd[-1] == pytest.approx(rec["triggersource"]["mjd"])


def test_light_curve_lsst_flux_based(shared_data, lsst_map):
    rec = codec.decode((shared_data / "lsst/schemas/10.0/fakeAlert.avro").read_bytes())
    lc = codec.light_curve(rec, lsst_map)
    src = rec["diaSource"]
    cur = lc.source_id == src["diaSourceId"]
    assert lc.flux[cur][0] == pytest.approx(src["psfFlux"])
    assert lc.mag[cur][0] == pytest.approx(31.4 - 2.5 * math.log10(src["psfFlux"]))
    assert lc.object_id == rec["diaObject"]["diaObjectId"]


def test_light_curve_never_raises_on_junk(ztf_map, decat_map):
    assert len(codec.light_curve({}, ztf_map)) == 0
    junk = {
        "objectId": "x",
        "candidate": {"candid": 5, "jd": "not a time", "fid": 9, "magpsf": "abc", "sigmapsf": None,
                      "magzpsci": None, "isdiffpos": None},
        "prv_candidates": [None, {"candid": None}, {"candid": 7, "jd": 2459000.5, "fid": 1,
                                                     "magpsf": float("nan"), "sigmapsf": 0.1, "magzpsci": 26.0}],
    }
    lc = codec.light_curve(junk, ztf_map)
    assert len(lc) == 3 and not lc.detected.any()
    assert lc.source_id.tolist().count(-1) == 1 and set(lc.filter.tolist()) == {"", "g"}
    assert len(codec.light_curve({"triggersource": None, "sources": None}, decat_map)) == 0
    odd = {"candidate": [1, 2], "prv_candidates": [{"candid": 2**70, "fid": [1], "jd": 2459000.5,
                                                   "magpsf": 18.0, "sigmapsf": 0.1, "magzpsci": None}]}
    lc = codec.light_curve(odd, ztf_map)
    assert len(lc) == 1 and not lc.detected.any() and lc.filter[0] == ""


def test_light_curve_3_5_forced_history_are_non_detections(shared_data, ztf_map):
    rec = codec.decode((shared_data / "ztf/alerts-3.5/forcedphot_test_1660293514215020000.avro").read_bytes())
    lc = codec.light_curve(rec, ztf_map)
    assert lc.detected.sum() == 1 and (lc.source_id == -1).sum() == len(rec["prv_candidates"])
    assert np.isfinite(lc.limmag[~lc.detected]).all()
