"""Schema maps: loading, validation, lookups, YAML round trip, survey-agnostic processing code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pgbctl import schemamap
from pgbctl.schemamap import SchemaMap, SchemaMapError

SURVEYS = ["decat", "lsst", "ztf"]


def test_available_lists_packaged_maps():
    assert schemamap.available() == SURVEYS


@pytest.mark.parametrize("survey", SURVEYS)
def test_every_map_loads_and_is_cached(survey):
    m = schemamap.load(survey)
    assert m.survey == survey
    assert m is schemamap.load(survey)
    for k in schemamap.REQUIRED_KEYS:
        assert m[k] is not None
    # every filter letter has an sncosmo band, every version is a string
    assert set(map(str, m["FILTER_MAP"].values())) <= set(m["SNCOSMO_BANDS"])
    assert all(isinstance(v, str) for v in m["SCHEMA_VERSIONS"])


def test_unknown_survey_error_lists_known():
    with pytest.raises(SchemaMapError) as e:
        schemamap.load("hubble")
    msg = str(e.value)
    assert "hubble" in msg and "ztf" in msg and "decat" in msg
    with pytest.raises(SchemaMapError):
        schemamap.load("../ztf")


def test_ztf_lookups(ztf_map):
    assert ztf_map["mag"] == "magpsf"
    assert ztf_map["magerr"] == "sigmapsf"
    assert ztf_map["magzp"] == "magzpsci"
    assert ztf_map["sourceId"] == "candid"
    assert ztf_map["prvSources"] == "prv_candidates"
    assert ztf_map["time_format"] == "jd"
    assert ztf_map["SNCOSMO_BANDS"] == {"g": "ztfg", "r": "ztfr", "i": "ztfi"}
    assert ztf_map["cutouts"] == {"location": "alert",
                                  "fields": ["cutoutScience", "cutoutTemplate", "cutoutDifference"]}
    assert ztf_map["upper_limit"] == {"rule": "null_source_id", "limmag": "diffmaglim"}
    # `fields:` sub-map is reachable by generic name
    for k in ("rb", "drb", "nbad", "fwhm", "elong", "magdiff", "distpsnr1", "sgscore1", "ssdistnr", "ndethist"):
        assert ztf_map[k] == k
    assert "rb" in ztf_map and "nope" not in ztf_map
    assert ztf_map.get("nope", 5) == 5
    with pytest.raises(KeyError, match="ztf"):
        ztf_map["nope"]


def test_decat_lookups(decat_map):
    assert decat_map["cutouts"]["location"] == "source"
    assert decat_map["time_format"] == "mjd"
    assert decat_map["rb"] == "rb"
    assert decat_map["diffmaglim"] == "limmag"
    assert decat_map["upper_limit"] is None
    assert "nbad" not in decat_map  # maps only what it has


def test_lsst_is_pure_data(lsst_map):
    assert lsst_map["source"] == "diaSource"
    assert lsst_map["prvSources"] == "prvDiaSources"
    assert lsst_map["flux"] == "psfFlux"
    assert lsst_map["mag"] is None and lsst_map["FLUX_ZP"] == 31.4
    assert lsst_map["rb"] == "reliability"


@pytest.mark.parametrize(
    "survey,value,letter",
    [("ztf", 1, "g"), ("ztf", 2, "r"), ("ztf", "3", "i"), ("ztf", 9, None), ("ztf", None, None),
     ("decat", "g DECam SDSS c0001 4720.0 1520.0", "g"), ("decat", "r DECam SDSS c0002 6415.0 1480.0", "r"),
     ("decat", "VR DECam c0007", None), ("lsst", "y", "y")],
)
def test_generic_filter(survey, value, letter):
    m = schemamap.load(survey)
    assert m.generic_filter(value) == letter
    if letter:
        assert m.sncosmo_band(letter) == m["SNCOSMO_BANDS"][letter]


def test_frozen_and_raw_is_a_copy(ztf_map):
    with pytest.raises(AttributeError):
        ztf_map.survey = "x"
    with pytest.raises(AttributeError):
        ztf_map._d = {}
    raw = ztf_map.raw
    raw["mag"] = "changed"
    raw["fields"]["rb"] = "changed"
    assert ztf_map["mag"] == "magpsf" and ztf_map["rb"] == "rb"
    ztf_map["cutouts"]["fields"].append("x")  # returned containers are copies too
    assert "x" not in ztf_map["cutouts"]["fields"]


@pytest.mark.parametrize("survey", SURVEYS)
def test_yaml_round_trip(survey):
    m = schemamap.load(survey)
    text = m.to_yaml()
    back = SchemaMap.from_yaml(text)
    assert back == m and back.raw == m.raw
    assert SchemaMap.from_yaml(text.encode()) == m
    assert hash(back) == hash(m)


def test_missing_keys_reported_at_once(ztf_map):
    d = ztf_map.raw
    for k in ("mag", "filter", "TOPIC_SYNTAX"):
        d.pop(k)
    with pytest.raises(SchemaMapError) as e:
        SchemaMap.from_yaml(yaml.safe_dump(d))
    msg = str(e.value)
    assert "filter" in msg and "TOPIC_SYNTAX" in msg and "mag" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "patch,needle",
    [
        ({"time_format": "unix"}, "time_format"),
        ({"cutouts": {"location": "moon", "fields": []}}, "cutouts"),
        ({"cutouts": ["a", "b"]}, "cutouts"),
        ({"SCHEMA_VERSIONS": [3.3]}, "SCHEMA_VERSIONS"),
        ({"FILTER_MAP": {1: "g", 2: "q"}}, "SNCOSMO_BANDS"),
        ({"upper_limit": {"rule": "magic"}}, "upper_limit"),
        ({"magzp": None}, "photometry"),
        ({"FILTER_REGEX": "("}, "FILTER_REGEX"),
    ],
)
def test_invalid_values(ztf_map, patch, needle):
    d = ztf_map.raw
    d.update(patch)
    with pytest.raises(SchemaMapError, match=needle):
        SchemaMap(d)


def test_not_yaml_or_not_mapping():
    with pytest.raises(SchemaMapError):
        SchemaMap.from_yaml("a: [unclosed")
    with pytest.raises(SchemaMapError, match="mapping"):
        SchemaMap.from_yaml("- just a list")


def test_from_file(tmp_path, decat_map):
    p = tmp_path / "x.yaml"
    p.write_text(decat_map.to_yaml())
    assert SchemaMap.from_file(p) == decat_map


@pytest.mark.parametrize(
    "fullname,survey",
    [("ztf.alert", "ztf"), ("decat.object", "decat"), ("lsst.v10_0.alert", "lsst"), ("lsst.v9_0.alert", "lsst")],
)
def test_for_schema_name(fullname, survey):
    assert schemamap.for_schema_name(fullname).survey == survey


def test_for_schema_name_unknown():
    with pytest.raises(SchemaMapError, match="no schema maps match"):
        schemamap.for_schema_name("pgbctl.test.not_an_alert")


# ---- processing code must not branch on survey names -------------------------------------

_FORBIDDEN = ("ztf", "decat", "lsst", "rubin", "magpsf", "sigmapsf", "candid", "prv_candidates",
              "diffmaglim", "triggersource", "cutoutScience", "diaSource", "fid")


def _non_doc_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docs.add(id(body[0].value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


@pytest.mark.parametrize("module", ["codec.py", "schemamap.py"])
def test_no_survey_names_in_processing_code(module):
    path = Path(schemamap.__file__).parent / module
    strings = _non_doc_strings(path)
    bad = [s for s in strings for w in _FORBIDDEN if w.lower() in s.lower().replace("candidate", "")]
    assert bad == [], f"{module} names survey specifics in code: {bad}"
