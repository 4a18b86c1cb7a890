"""Shared fixtures.

* ``shared_data`` — the ``../shared/data`` folder (skips the test when absent).
* ``sample`` — parametrizes a test over one alert per survey/schema version: real packets from
  shared data when present, synthetic ones always (see ``SAMPLES``).
* ``real_alert_path`` — parametrizes a test over EVERY real alert file in shared data (one
  skipped case when absent).
* ``ztf_map`` / ``decat_map`` / ``lsst_map``, ``synthetic_ztf`` (a few synthetic ZTF packets).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from pgbctl.paths import shared_data_dir

SHARED: Path | None = shared_data_dir()


def real_alert_paths() -> list[Path]:
    """Every real alert packet in shared data (ZTF, DECAT, and Rubin's fake sample alerts)."""
    if SHARED is None:
        return []
    out = sorted((SHARED / "ztf").rglob("*.avro")) + sorted((SHARED / "decat").glob("*.avro"))
    out += sorted((SHARED / "lsst" / "schemas").glob("*/fakeAlert.avro"))
    return out


@dataclass(frozen=True)
class Sample:
    """One alert packet of a known survey and schema version."""

    id: str
    survey: str
    version: str
    origin: str  # "real" | "synthetic"
    load: Callable[[], bytes]

    @property
    def data(self) -> bytes:
        return self.load()


@functools.lru_cache(maxsize=None)
def _synthetic(survey: str, version: str, seed: int = 7, n: int = 12) -> bytes:
    """The synthetic packet with the longest history among the first ``n`` of a stream."""
    from pgbctl import codec, schemamap, synth

    smap = schemamap.load(survey)
    packets = synth.generate(n, seed, survey=survey, schema_version=version, sn_model="bazin")
    return max(packets, key=lambda p: len(codec.prv_records(codec.decode(p), smap)))


def _real(rel: str) -> Callable[[], bytes]:
    return functools.lru_cache(maxsize=1)(lambda: (SHARED / rel).read_bytes())


def _registry() -> list[Sample]:
    out: list[Sample] = []
    real = {
        "ztf-3.3-original-header": ("ztf", "3.3", "ztf/alerts/ztf_3.3_1154308030015010004.avro"),
        "ztf-3.3-validschema": ("ztf", "3.3", "ztf/alerts/ztf_3.3_validschema_1154446891615015011.avro"),
        "ztf-3.3": ("ztf", "3.3", "ztf/alerts/ZTF18aamyaaj.1704217901015015001.ztf_20210901_programid1.avro"),
        "ztf-3.3-snia": ("ztf", "3.3", "ztf/ZTF21abiuvdk/ZTF21abiuvdk.1707409520815015012.ztf_20210904_programid1.avro"),
        "ztf-3.5": ("ztf", "3.5", "ztf/alerts-3.5/forcedphot_test_1660293514215020000.avro"),
        "decat-0.14": ("decat", "0.14", "decat/DC21baaa.570349.decat_20210414_2021A-0113.avro"),
        "lsst-9.0": ("lsst", "9.0", "lsst/schemas/9.0/fakeAlert.avro"),
        "lsst-10.0": ("lsst", "10.0", "lsst/schemas/10.0/fakeAlert.avro"),
        "lsst-11.0": ("lsst", "11.0", "lsst/schemas/11.0/fakeAlert.avro"),
    }
    if SHARED is not None:
        for sid, (survey, version, rel) in real.items():
            if (SHARED / rel).is_file():
                out.append(Sample(f"real-{sid}", survey, version, "real", _real(rel)))
    for survey, version in (("ztf", "3.3"), ("ztf", "3.5"), ("ztf", "4.02"), ("decat", "0.14")):
        out.append(Sample(f"synth-{survey}-{version}", survey, version, "synthetic",
                          functools.partial(_synthetic, survey, version)))
    return out


SAMPLES: list[Sample] = _registry()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sample" in metafunc.fixturenames:
        metafunc.parametrize("sample", SAMPLES, ids=[s.id for s in SAMPLES])
    if "real_alert_path" in metafunc.fixturenames:
        paths = real_alert_paths()
        if paths:
            params = [pytest.param(p, marks=pytest.mark.shared_data) for p in paths]
            ids = [f"{p.parent.name}/{p.name}" for p in paths]
        else:
            params = [pytest.param(None, marks=pytest.mark.skip(reason="shared data absent"))]
            ids = ["no-shared-data"]
        metafunc.parametrize("real_alert_path", params, ids=ids)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if SHARED is None:
        pytest.skip("shared data (../shared/data or $PGBCTL_SHARED_DATA) absent")
    return SHARED


@pytest.fixture(scope="session")
def ztf_map():
    from pgbctl import schemamap

    return schemamap.load("ztf")


@pytest.fixture(scope="session")
def decat_map():
    from pgbctl import schemamap

    return schemamap.load("decat")


@pytest.fixture(scope="session")
def lsst_map():
    from pgbctl import schemamap

    return schemamap.load("lsst")


@pytest.fixture(scope="session")
def synthetic_ztf() -> list[bytes]:
    """30 synthetic ZTF 3.3 packets (mixed kinds, Bazin SNe), seed 11."""
    from pgbctl import synth

    return synth.generate(30, 11, sn_model="bazin")
