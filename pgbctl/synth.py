"""Deterministic synthetic alerts: schema-valid single-record Avro containers.

Survey-agnostic: the generator walks the bundled (fixed, null-first) writer schema of the
survey version (``AVRO_SCHEMAS`` in the schema map) to build a blank record, then fills the
fields the map names (time, filter, mag, ..., ``fields.rb``, ...) with values from a simple
physical model of the object kind. Survey conventions used only by the generator (id formats,
zero points, constants) live in the map's ``synth:`` section.

Same arguments → byte-identical output (sync markers are derived from the seed, gzip members
carry no timestamp, every random draw comes from one seeded ``numpy`` Generator).

Kinds: ``sn`` (supernova: SALT2 2.4 via sncosmo when ``SNCOSMO_DATA_DIR`` holds it, else a
Bazin rise/fall), ``variable`` (nuclear variability, both subtraction signs), ``artifact``
(fails purity cuts: low rb, bad pixels, odd shape), ``asteroid`` (known solar-system object
nearby), ``star`` (point source on top of a star), ``mixed`` (a seeded mix).
"""

from __future__ import annotations

import copy
import datetime as _dt
import functools
import gzip
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pgbctl import codec
from pgbctl.schemamap import SchemaMap, load as load_map

__all__ = [
    "KINDS",
    "CORRUPTIONS",
    "generate",
    "iter_generate",
    "iter_records",
    "write_dir",
    "stream",
    "filename_for",
    "kafka_topic_for",
    "bundled_schema",
    "corrupt",
]

KINDS = ("sn", "variable", "artifact", "asteroid", "star")
_MIX = {"sn": 0.3, "variable": 0.2, "artifact": 0.2, "asteroid": 0.15, "star": 0.15}
#: how many alerts (detections) one object of a kind yields at most (inclusive range)
_ALERTS_PER_OBJECT = {"sn": (4, 20), "variable": (2, 8), "star": (1, 5), "artifact": (1, 2), "asteroid": (1, 1)}
#: 2026-01-01 03:00 UTC (objectIds come out as ZTF26...)
DEFAULT_START_JD = 2461041.625
_JD_UNIX = 2440587.5
_SNR5 = 2.5 / math.log(10.0)  # mag error = 1.0857 / SNR


# =============================================================================================
# schema helpers
# =============================================================================================


@functools.lru_cache(maxsize=None)
def _bundled_text(filename: str) -> str:
    return (codec.AVRO_SCHEMAS_DIR / filename).read_text(encoding="utf-8")


def bundled_schema(smap: SchemaMap | str, schema_version: str | None = None) -> dict:
    """The bundled fixed writer schema of a survey version (a fresh dict)."""
    smap = load_map(smap) if isinstance(smap, str) else smap
    version = schema_version or smap.schema_versions[0]
    files = smap.get("AVRO_SCHEMAS") or {}
    if version not in files:
        raise ValueError(
            f"no bundled Avro schema for {smap.survey} {version}; bundled versions: "
            f"{', '.join(files) or '(none)'}"
        )
    return json.loads(_bundled_text(files[version]))


class _Schema:
    """Named-type index and blank-record factory for one writer schema."""

    def __init__(self, schema: dict) -> None:
        self.schema = schema
        self.text = json.dumps(schema)
        self.named: dict[str, Any] = {}
        codec._walk_named(schema, None, self.named)

    def resolve(self, t: Any) -> Any:
        if isinstance(t, str) and t in self.named:
            return self.named[t]
        return t

    def nonnull(self, t: Any) -> Any:
        if isinstance(t, list):
            rest = [b for b in t if b != "null"]
            return self.resolve(rest[0]) if rest else "null"
        return self.resolve(t)

    def record_of(self, rec_schema: dict, field_name: str) -> dict | None:
        """The record schema of a field (through unions and arrays)."""
        for f in rec_schema.get("fields", []):
            if f["name"] == field_name:
                t = self.nonnull(f["type"])
                if isinstance(t, dict) and t.get("type") == "array":
                    t = self.nonnull(t["items"])
                return t if isinstance(t, dict) and t.get("type") == "record" else None
        return None

    def field_types(self, rec_schema: dict) -> dict[str, Any]:
        return {f["name"]: f["type"] for f in rec_schema.get("fields", [])}

    def blank(self, t: Any) -> Any:
        t = self.resolve(t)
        if isinstance(t, list):
            return None if "null" in t else self.blank(t[0])
        if isinstance(t, dict):
            kind = t.get("type")
            if kind == "record":
                out = {}
                for f in t["fields"]:
                    if "default" in f:
                        out[f["name"]] = copy.deepcopy(f["default"])
                    else:
                        out[f["name"]] = self.blank(f["type"])
                return out
            if kind == "array":
                return []
            if kind == "map":
                return {}
            if kind == "enum":
                return t["symbols"][0]
            if kind == "fixed":
                return b"\0" * t["size"]
            return self.blank(kind)
        return {"null": None, "boolean": False, "int": 0, "long": 0, "float": 0.0, "double": 0.0,
                "bytes": b"", "string": ""}.get(t)

    def coerce(self, t: Any, value: Any) -> Any:
        """``value`` made to fit type ``t`` (None stays None when nullable)."""
        if value is None:
            if isinstance(t, list) and "null" in t:
                return None
            return self.blank(t)
        base = self.nonnull(t)
        if isinstance(base, dict):
            base = base.get("type") if base.get("type") in ("int", "long", "float", "double", "string",
                                                               "boolean", "bytes") else base
        if base in ("int", "long"):
            if isinstance(value, (int, np.integer)):
                return int(value)  # no float round trip: 19-digit ids must stay exact
            return int(round(float(value)))
        if base in ("float", "double"):
            return float(value)
        if base == "string":
            return str(value)
        if base == "boolean":
            return bool(value)
        return value


@functools.lru_cache(maxsize=None)
def _schema_for(survey: str, version: str) -> _Schema:
    return _Schema(bundled_schema(load_map(survey), version))


# =============================================================================================
# time and names
# =============================================================================================


def _jd_to_datetime(jd: float) -> _dt.datetime:
    return _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc) + _dt.timedelta(days=jd - _JD_UNIX)


def kafka_topic_for(jd_or_date: Any, smap: SchemaMap | str) -> str:
    """The survey's Kafka topic for a night, from ``TOPIC_SYNTAX`` (``yyyymmdd`` → UTC date).

    ``jd_or_date``: a JD (> 2 400 000), an MJD, a ``date``/``datetime``, or ``"YYYYMMDD"`` /
    ``"YYYY-MM-DD"``. A JD/MJD is shifted by ``TOPIC_DATE_UTC_OFFSET_HOURS`` (default 0) before
    taking its date, so the whole night lands on one topic (DECAT: -12 h, the Chilean night's
    start date; ZTF: 0, Palomar nights fall within one UTC date).
    """
    smap = load_map(smap) if isinstance(smap, str) else smap
    syntax = smap["TOPIC_SYNTAX"]
    if "yyyymmdd" not in syntax:
        return syntax
    x = jd_or_date
    if isinstance(x, _dt.datetime):
        d = (x.astimezone(_dt.timezone.utc) if x.tzinfo else x).date()
    elif isinstance(x, _dt.date):
        d = x
    elif isinstance(x, str):
        s = x.strip().replace("-", "")
        if len(s) != 8 or not s.isdigit():
            raise ValueError(f"date string must be YYYYMMDD or YYYY-MM-DD, got {x!r}")
        d = _dt.date(int(s[:4]), int(s[4:6]), int(s[6:]))
    elif isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool):
        jd = float(x) if float(x) > 2_400_000 else float(x) + 2400000.5
        # the night's date: UTC date shifted by the map's TOPIC_DATE_UTC_OFFSET_HOURS
        shift = float(smap.get("TOPIC_DATE_UTC_OFFSET_HOURS") or 0.0) / 24.0
        d = _jd_to_datetime(jd + shift).date()
    else:
        raise TypeError(f"expected a JD/MJD, date or YYYYMMDD string, got {type(x).__name__}")
    return syntax.replace("yyyymmdd", d.strftime("%Y%m%d"))


def filename_for(alert: dict, smap: SchemaMap) -> str:
    """``<objectId>.<sourceId>.<topic>.avro`` — the survey's archive file name of an alert."""
    oid, sid = codec.alert_ids(alert, smap)
    src = codec.source_record(alert, smap)
    t = codec._f(src.get(smap["time"]))
    jd = t if smap["time_format"] == "jd" else t + 2400000.5
    return f"{oid}.{sid}.{kafka_topic_for(jd, smap)}.avro"


def _letters(i: int, n: int) -> str:
    out = []
    for _ in range(n):
        i, r = divmod(i, 26)
        out.append(chr(ord("a") + r))
    return "".join(reversed(out))


# =============================================================================================
# physical models
# =============================================================================================


@dataclass
class _Epoch:
    jd: float
    letter: str
    true_mag: float  # magnitude of |difference flux| (inf = no flux)
    positive: bool
    limmag: float
    magzp: float
    detected: bool = False
    mag: float = math.nan
    magerr: float = math.nan
    sid: int | None = None


@dataclass
class _Object:
    kind: str
    object_id: Any
    ra: float
    dec: float
    epochs: list[_Epoch] = field(default_factory=list)
    props: dict[str, float] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _salt2_source(data_dir: str):
    try:
        import sncosmo

        return sncosmo.get_source("salt2", version="2.4")
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def _band_ok(data_dir: str, band: str | None) -> bool:
    """Can sncosmo load this bandpass (tried once per band; offline a missing one fails fast)?"""
    if not band:
        return False
    try:
        import sncosmo

        sncosmo.get_bandpass(band)
        return True
    except Exception:
        return False


def _salt2_model():
    """A new SALT2 v2.4 sncosmo model, or None when it cannot be loaded offline (the model
    files must be under ``$SNCOSMO_DATA_DIR/models/salt2/salt2-4``)."""
    d = os.environ.get("SNCOSMO_DATA_DIR")
    if not d or not (Path(d) / "models" / "salt2" / "salt2-4").is_dir():
        return None
    src = _salt2_source(d)
    if src is None:
        return None
    import sncosmo

    return sncosmo.Model(source=src)


class _SNCurve:
    """Magnitude vs time per band: SALT2 when available (and the band loads), else Bazin."""

    def __init__(self, rng: np.random.Generator, t0: float, smap: SchemaMap, model: str) -> None:
        self.t0 = t0
        self.peak = rng.uniform(17.3, 19.3)
        self.trise = rng.uniform(2.5, 5.0)
        self.tfall = rng.uniform(15.0, 30.0)
        self.color = {"g": 0.0, "r": 0.1, "i": 0.3, "u": -0.3, "z": 0.4, "y": 0.5, "Y": 0.5}
        self.z = rng.uniform(0.02, 0.09)
        self.x1 = float(np.clip(rng.normal(0.0, 1.0), -3, 3))
        self.c = float(np.clip(rng.normal(0.0, 0.08), -0.3, 0.3))
        self.smap = smap
        self.salt2 = None
        if model in ("auto", "salt2"):
            m = _salt2_model()
            if m is None and model == "salt2":
                raise RuntimeError("SALT2 2.4 not loadable: set SNCOSMO_DATA_DIR to a dir holding models/salt2/salt2-4")
            d = os.environ.get("SNCOSMO_DATA_DIR", "")
            letters = smap.get("synth", {}).get("filters") or list(smap["SNCOSMO_BANDS"])
            if m is not None and not all(_band_ok(d, smap.sncosmo_band(x)) for x in letters):
                if model == "salt2":
                    raise RuntimeError(f"SALT2 requested but the {smap.survey} bandpasses are not loadable offline")
                m = None
            if m is not None:
                try:
                    m.set(z=self.z, t0=0.0, x1=self.x1, c=self.c)
                    m.set_source_peakabsmag(-19.3 + rng.normal(0, 0.15), "bessellb", "ab")
                    self.salt2 = m
                except Exception:
                    self.salt2 = None

    def mag(self, jd: float, letter: str) -> float:
        dt = jd - self.t0
        if self.salt2 is not None:
            band = self.smap.sncosmo_band(letter)
            try:
                if dt < -25 or dt > 120:
                    return math.inf
                with np.errstate(all="ignore"):
                    f = float(self.salt2.bandflux(band, dt, zp=25.0, zpsys="ab"))
                return 25.0 - 2.5 * math.log10(f) if f > 0 else math.inf
            except Exception:
                self.salt2 = None  # should not happen (bands checked): Bazin for this object
        # Bazin: f = exp(-dt/tfall) / (1 + exp(-dt/trise)), normalised to peak mag
        tf = self.tfall * (1.0 if letter in ("g", "u") else 1.4)
        with np.errstate(over="ignore"):
            f = math.exp(-dt / tf) / (1.0 + math.exp(min(-dt / self.trise, 700.0)))
        tpk = self.trise * math.log(tf / self.trise - 1.0) if tf > 2 * self.trise else 0.0
        fpk = math.exp(-tpk / tf) / (1.0 + math.exp(-tpk / self.trise))
        if f <= 0:
            return math.inf
        return self.peak + self.color.get(letter, 0.0) - 2.5 * math.log10(f / fpk)


# =============================================================================================
# generator
# =============================================================================================


@dataclass
class _Ctx:
    smap: SchemaMap
    sch: _Schema
    version: str
    rng: np.random.Generator
    syn: dict
    cutout_bytes: int | None
    seed: int


def _u(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = lo_hi
    return float(rng.uniform(lo, hi))


def _plan_object(ctx: _Ctx, kind: str, oid: Any, start_jd: float, max_alerts: int, sn_model: str) -> _Object:
    rng, syn = ctx.rng, ctx.syn
    dec_lo, dec_hi = syn.get("dec_range", [-30.0, 88.0])
    # uniform on the sphere within the dec band
    s = rng.uniform(math.sin(math.radians(dec_lo)), math.sin(math.radians(dec_hi)))
    obj = _Object(kind, oid, float(rng.uniform(0, 360)), math.degrees(math.asin(s)))
    letters = list(syn.get("filters", ["g", "r"]))
    night_frac = syn.get("night_frac", [0.65, 0.95])
    zp_rng, lim_rng = syn.get("magzp", [26.0, 26.5]), syn.get("limmag", [20.0, 21.0])
    depth = float(np.mean(lim_rng))
    first_night = math.floor(start_jd - 0.5) + 0.5 + int(rng.integers(0, 8))

    # brightness model per kind: returns (mag of |difference flux|, positive?) at (jd, letter)
    if kind == "sn":
        curve = _SNCurve(rng, first_night + rng.uniform(14, 24), ctx.smap, sn_model)
        nights = range(0, 70)
        obj.props.update(host_offset=rng.uniform(0.8, 6.0), hostmag=rng.uniform(17.5, 21.0))

        def model(jd, letter):
            return curve.mag(jd, letter), True
    elif kind in ("variable", "star"):
        base = rng.uniform(14.0, 18.0) if kind == "star" else rng.uniform(16.5, 19.0)
        amp = rng.uniform(0.15, 0.8)
        period = float(np.exp(rng.uniform(np.log(0.3), np.log(40.0))))
        phase = rng.uniform(0, 2 * math.pi)
        f0 = 10 ** (-0.4 * base)
        nights = range(0, 40)
        obj.props.update(refmag=base, hostmag=base)

        def model(jd, letter):
            d = f0 * amp * math.sin(2 * math.pi * jd / period + phase)
            return (-2.5 * math.log10(abs(d)) if d != 0 else math.inf), d > 0
    elif kind == "artifact":
        m0 = rng.uniform(17.0, depth - 0.3)
        nights = range(0, 3)

        def model(jd, letter):
            return m0 + rng.normal(0, 0.3), bool(rng.random() < 0.7)
    else:  # asteroid: seen once, nothing before
        m0 = rng.uniform(17.0, depth - 0.5)
        nights = range(0, 1)
        obj.props.update(ssmag=m0 + rng.normal(0, 0.2), ssdist=rng.uniform(0.1, 5.0),
                         ssnum=int(rng.integers(1000, 700000)))

        def model(jd, letter):
            return m0, True

    n_det = 0
    for k in nights:
        night = first_night + k
        if kind not in ("asteroid",) and rng.random() < 0.3:
            continue  # weather / scheduling
        todo = letters if kind != "asteroid" else letters[:1]
        for j, letter in enumerate(todo):
            jd = night - 0.5 + _u(rng, night_frac) + j * 0.02
            true_mag, pos = model(jd, letter)
            lim = _u(rng, lim_rng)
            ep = _Epoch(jd, letter, float(true_mag), bool(pos), lim, _u(rng, zp_rng))
            if math.isfinite(true_mag):
                snr = 5.0 * 10 ** (-0.4 * (true_mag - lim))
                err = _SNR5 / max(snr, 1e-3)
                obs = true_mag + rng.normal(0.0, min(err, 1.0))
                if kind in ("artifact", "asteroid") or obs < lim:
                    ep.detected = True
                    ep.mag = float(obs)
                    ep.magerr = float(max(err, 0.005))
            if ep.detected and n_det >= max_alerts:
                continue  # the object is not observed any more
            n_det += ep.detected
            obj.epochs.append(ep)
        if n_det >= max_alerts:
            break
    obj.epochs.sort(key=lambda e: e.jd)
    return obj


def _stamp(ctx: _Ctx, name: str) -> bytes:
    """A gzipped FITS-like cutout (deterministic: no gzip timestamp)."""
    rng = ctx.rng
    hdr_cards = [
        "SIMPLE  =                    T",
        "BITPIX  =                   16",
        "NAXIS   =                    2",
        "NAXIS1  =                   63",
        "NAXIS2  =                   63",
        f"OBJECT  = '{name[:60]}'",
        "ORIGIN  = 'pgbctl.synth'",
        "END",
    ]
    header = "".join(c.ljust(80) for c in hdr_cards).encode("ascii")
    header = header.ljust(2880, b" ")
    if ctx.cutout_bytes:
        payload = rng.bytes(max(0, int(ctx.cutout_bytes) - 150))
        return gzip.compress(header + payload, compresslevel=1, mtime=0)
    yy, xx = np.mgrid[-31:32, -31:32]
    img = 200.0 + rng.normal(0, 8, (63, 63)) + 600.0 * np.exp(-(xx**2 + yy**2) / 8.0)
    data = img.astype(">i2").tobytes()
    data = data.ljust((len(data) + 2879) // 2880 * 2880, b"\0")
    return gzip.compress(header + data, compresslevel=6, mtime=0)


def _setf(ctx: _Ctx, rec: dict, types: dict, name: str | None, value: Any) -> None:
    if name and name in types:
        rec[name] = ctx.sch.coerce(types[name], value)


def _source_record(ctx: _Ctx, rec_schema: dict, obj: _Object, ep: _Epoch, ndet: int,
                   first_det_jd: float | None, n_epochs: int, with_cutouts: bool) -> dict:
    smap, syn, rng, sch = ctx.smap, ctx.syn, ctx.rng, ctx.sch
    types = sch.field_types(rec_schema)
    rec = sch.blank(rec_schema)
    for k, v in (syn.get("source_static") or {}).items():
        _setf(ctx, rec, types, k, v)
    is_jd = smap["time_format"] == "jd"
    t = ep.jd if is_jd else ep.jd - 2400000.5
    F = smap.fields
    missing = syn.get("missing")

    def setg(key: str, value: Any) -> None:  # generic key → survey field
        _setf(ctx, rec, types, smap.get(key), value)

    setg("time", t)
    fvals = syn.get("filter_values") or {}
    inv = {v: k for k, v in smap["FILTER_MAP"].items()}
    setg("filter", fvals.get(ep.letter, inv.get(ep.letter)))
    setg("ra", obj.ra + (rng.normal(0, 0.1 / 3600) if ep.detected else 0.0))
    setg("dec", obj.dec + (rng.normal(0, 0.1 / 3600) if ep.detected else 0.0))
    setg("magzp", ep.magzp)
    setg("diffmaglim", ep.limmag)
    ul = smap.get("upper_limit") or {}
    _setf(ctx, rec, types, ul.get("limmag"), ep.limmag)
    if "nid" in F and syn.get("night_epoch_jd") is not None:
        setg("nid", math.floor(ep.jd - syn["night_epoch_jd"]))
    setg("exptime", 30.0)
    # forced photometry (difference flux in the image's DN) wherever the record has it
    if smap.get("forced_flux"):
        f_lim = 10 ** (-0.4 * (ep.limmag - ep.magzp)) / 5.0
        f_true = (10 ** (-0.4 * (ep.true_mag - ep.magzp)) if math.isfinite(ep.true_mag) else 0.0)
        _setf(ctx, rec, types, smap["forced_flux"], (f_true if ep.positive else -f_true) + rng.normal(0, f_lim))
        _setf(ctx, rec, types, smap.get("forced_fluxerr"), f_lim)
    if not ep.detected:
        setg("sourceId", None)
        setg("mag", None)
        setg("magerr", None)
        setg("isdiffpos", None)
        return rec

    setg("sourceId", ep.sid)
    if "pid" in F and syn.get("pid_divisor"):
        setg("pid", ep.sid // int(syn["pid_divisor"]))
    setg("mag", ep.mag)
    setg("magerr", ep.magerr)
    if smap.get("flux"):
        f = 10 ** (-0.4 * (ep.mag - ep.magzp))
        setg("flux", f if ep.positive else -f)
        setg("fluxerr", f * ep.magerr * codec.LN10_OVER_2P5)
    setg("isdiffpos", "t" if ep.positive else "f")
    good = obj.kind != "artifact"
    if good:
        setg("rb", rng.uniform(0.65, 0.99))
        setg("drb", rng.uniform(0.9, 1.0))
        setg("nbad", 0)
        setg("fwhm", rng.uniform(1.5, 3.5))
        setg("elong", rng.uniform(1.0, 1.3))
        setg("magdiff", rng.uniform(-0.1, 0.1))
    else:
        setg("rb", rng.uniform(0.02, 0.3))
        setg("drb", rng.uniform(0.0, 0.2))
        setg("nbad", int(rng.integers(1, 7)))
        setg("fwhm", rng.choice([rng.uniform(0.3, 0.8), rng.uniform(5.0, 9.0)]))
        setg("elong", rng.uniform(1.7, 3.5))
        setg("magdiff", rng.choice([-1, 1]) * rng.uniform(0.4, 1.5))
    setg("seeing", rng.uniform(0.8, 2.0))
    setg("magap", ep.mag + (rec.get(F.get("magdiff", ""), 0.0) or 0.0))
    # surroundings
    kind = obj.kind
    if kind == "sn":
        setg("distnr", obj.props["host_offset"] / 1.01)
        setg("magnr", obj.props["hostmag"])
        setg("distpsnr1", obj.props["host_offset"])
        setg("sgscore1", rng.uniform(0.0, 0.25))
        setg("classtar", rng.uniform(0.0, 0.5))
    elif kind in ("variable", "star"):
        setg("distnr", rng.uniform(0.0, 0.3))
        setg("magnr", obj.props["refmag"])
        setg("distpsnr1", rng.uniform(0.0, 0.4))
        setg("sgscore1", rng.uniform(0.9, 1.0) if kind == "star" else rng.uniform(0.0, 0.3))
        setg("classtar", rng.uniform(0.9, 1.0) if kind == "star" else rng.uniform(0.1, 0.6))
    else:
        setg("distnr", rng.uniform(3.0, 20.0))
        setg("magnr", rng.uniform(18.0, 22.0))
        setg("distpsnr1", rng.uniform(2.0, 30.0))
        setg("sgscore1", rng.uniform(0.0, 1.0))
        setg("classtar", rng.uniform(0.0, 1.0))
    setg("sgscore2", rng.uniform(0.0, 1.0))
    setg("distpsnr2", rng.uniform(5.0, 30.0))
    if kind == "asteroid":
        setg("ssdistnr", obj.props["ssdist"])
        setg("ssmagnr", obj.props["ssmag"])
        setg("ssnamenr", str(obj.props["ssnum"]))
    else:
        setg("ssdistnr", missing)
        setg("ssmagnr", missing)
    setg("ndethist", ndet)
    setg("ncovhist", max(n_epochs, ndet))
    setg("jdstarthist", first_det_jd if first_det_jd is not None else ep.jd)
    setg("jdendhist", ep.jd)
    setg("scorr", 5.0 * 10 ** (-0.4 * (ep.mag - ep.limmag)))
    cut = smap["cutouts"]
    if cut["location"] == "source":
        for name in cut["fields"]:
            if name in types:
                rec[name] = _stamp(ctx, f"{ep.sid}_{name}") if with_cutouts else sch.coerce(types[name], None)
    return rec


def _alert_record(ctx: _Ctx, obj: _Object, idx: int) -> dict:
    smap, syn, sch = ctx.smap, ctx.syn, ctx.sch
    top = sch.schema
    alert = sch.blank(top)
    types = sch.field_types(top)
    for k, v in (syn.get("alert_static") or {}).items():
        _setf(ctx, alert, types, k, v)
    ep = obj.epochs[idx]
    hist_days = float(syn.get("history_days", 30))
    dets = [e for e in obj.epochs[: idx + 1] if e.detected]
    first_det = dets[0].jd if dets else None
    src_schema = sch.record_of(top, smap["source"])
    src = _source_record(ctx, src_schema, obj, ep, len(dets), first_det, idx + 1, True)
    alert[smap["source"]] = src
    _setf(ctx, alert, types, smap["objectId"] if isinstance(smap["objectId"], str) else None, obj.object_id)
    _setf(ctx, alert, types, smap.get("schemavsn"), ctx.version)
    for name in syn.get("alert_copy_from_source") or []:
        if name in src:
            _setf(ctx, alert, types, name, src[name])
    iso = syn.get("alert_iso_time_field")
    if iso and first_det is not None:
        _setf(ctx, alert, types, iso, _jd_to_datetime(first_det).replace(tzinfo=None).isoformat())
    # history
    prv_schema = sch.record_of(top, smap["prvSources"])
    if prv_schema is not None:
        prv = []
        nd = 0
        upto = idx + 1 if syn.get("prv_includes_source") else idx
        for j, e in enumerate(obj.epochs[:upto]):
            nd += e.detected
            if ep.jd - e.jd <= hist_days:
                prv.append(_source_record(ctx, prv_schema, obj, e, nd, first_det, j + 1, False))
        alert[smap["prvSources"]] = prv
    fs = smap.get("forcedSources")
    fs_schema = sch.record_of(top, fs) if fs else None
    if fs_schema is not None:
        forced = [e for e in obj.epochs[: idx + 1] if ep.jd - e.jd <= hist_days]
        alert[fs] = [_source_record(ctx, fs_schema, obj, e, 0, first_det, 0, False) for e in forced]
    cut = smap["cutouts"]
    if cut["location"] == "alert":
        for name in cut["fields"]:
            t = sch.nonnull(types.get(name, "null"))
            if isinstance(t, dict) and t.get("type") == "record":
                c = sch.blank(t)
                for f in t["fields"]:
                    base = sch.nonnull(f["type"])
                    if base == "bytes":
                        c[f["name"]] = _stamp(ctx, f"{ep.sid}_{name}")
                    elif base == "string":
                        c[f["name"]] = f"candid{ep.sid}_{name}.fits.gz"
                alert[name] = c
            elif t == "bytes":
                alert[name] = _stamp(ctx, f"{ep.sid}_{name}")
    return alert


def _object_id(ctx: _Ctx, index: int, start_jd: float) -> Any:
    syn = ctx.syn
    n = int(syn.get("objectId_letters", 7))
    yy = _jd_to_datetime(start_jd).year % 100
    # spread ids over the name space, unique within a run
    base = int.from_bytes(hashlib.sha256(f"{ctx.seed}".encode()).digest()[:6], "big") % (26**n // 2)
    return f"{syn.get('objectId_prefix', '')}{yy:02d}{_letters(base + index * 7919, n)}"


def iter_records(n: int, seed: int = 0, *, survey: str = "ztf", schema_version: str | None = None,
                 kind: str = "mixed", start_jd: float | None = None, cutout_bytes: int | None = None,
                 sn_model: str = "auto", _block: int = 0) -> Iterator[tuple[dict, dict]]:
    """``(alert record, writer schema)`` pairs, time-ordered; see :func:`generate`.

    ``_block`` (used by :func:`stream`) shifts object and source ids so that consecutive
    blocks of one stream never reuse an id."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if kind != "mixed" and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose from mixed, {', '.join(KINDS)}")
    if sn_model not in ("auto", "salt2", "bazin"):
        raise ValueError("sn_model must be auto, salt2 or bazin")
    smap = load_map(survey)
    version = schema_version or smap.schema_versions[0]
    sch = _schema_for(survey, version)
    rng = np.random.default_rng(seed if not _block else [seed, _block])
    ctx = _Ctx(smap, sch, version, rng, dict(smap.get("synth") or {}),
               cutout_bytes, seed)
    start = DEFAULT_START_JD if start_jd is None else float(start_jd)
    kinds, weights = list(_MIX), np.array(list(_MIX.values()))
    objects: list[_Object] = []
    total = attempts = 0
    while total < n:
        attempts += 1
        if attempts > 50 * (n + 1):
            raise RuntimeError("synthetic objects keep coming out undetected")
        k = kind if kind != "mixed" else kinds[int(ctx.rng.choice(len(kinds), p=weights / weights.sum()))]
        lo, hi = _ALERTS_PER_OBJECT[k]
        cap = min(n - total, int(ctx.rng.integers(lo, hi + 1)))
        obj = _plan_object(ctx, k, _object_id(ctx, _block * 100_003 + len(objects), start), start, cap, sn_model)
        got = sum(e.detected for e in obj.epochs)
        if got == 0:
            continue
        objects.append(obj)
        total += got
    # one time-ordered stream; source ids increase along it
    stream = sorted(((e.jd, oi, ei) for oi, o in enumerate(objects) for ei, e in enumerate(o.epochs) if e.detected))
    syn = ctx.syn
    scheme = syn.get("sourceId_scheme", "sequence")
    seq = int(syn.get("sourceId_start", 1)) + int(ctx.rng.integers(0, 1000))
    seq += _block * (10**9 if scheme == "night_prefixed" else 10**5 * max(1, (n * 50) // 10**5 + 1))
    for jd, oi, ei in stream:
        seq += int(ctx.rng.integers(1, 50))
        if scheme == "night_prefixed":
            nid = math.floor(jd - float(syn.get("night_epoch_jd", 2457754.5)))
            objects[oi].epochs[ei].sid = nid * 10**15 + seq % 10**15
        else:
            objects[oi].epochs[ei].sid = seq
    for jd, oi, ei in stream:
        yield _alert_record(ctx, objects[oi], ei), sch.schema


def _sync(seed: int, i: int, survey: str, block: int = 0) -> bytes:
    key = f"pgbctl-synth/{survey}/{seed}/{i}" + (f"/{block}" if block else "")
    return hashlib.md5(key.encode()).digest()


def iter_generate(n: int, seed: int = 0, *, survey: str = "ztf", schema_version: str | None = None,
                  kind: str = "mixed", start_jd: float | None = None, cutout_bytes: int | None = None,
                  sn_model: str = "auto") -> Iterator[bytes]:
    """Iterator variant of :func:`generate`."""
    sch = None
    for i, (rec, schema) in enumerate(iter_records(n, seed, survey=survey, schema_version=schema_version,
                                                   kind=kind, start_jd=start_jd, cutout_bytes=cutout_bytes,
                                                   sn_model=sn_model)):
        if sch is None:
            sch = json.dumps(schema)
        yield codec.encode(rec, sch, sync=_sync(seed, i, survey))


def generate(n: int, seed: int = 0, *, survey: str = "ztf", schema_version: str | None = None,
             kind: str = "mixed", start_jd: float | None = None, cutout_bytes: int | None = None,
             sn_model: str = "auto") -> list[bytes]:
    """``n`` single-record Avro containers (fixed, null-first header), time-ordered.

    ``schema_version`` defaults to the map's first ``SCHEMA_VERSIONS`` entry (ZTF: 3.3).
    ``kind``: mixed | sn | variable | artifact | asteroid | star. ``start_jd``: first night
    (default 2026-01-01). ``cutout_bytes``: approximate size of each cutout (default: small,
    ~3 KB stamps; ~20 000 gives ZTF-like ~70 KB packets). ``sn_model``: auto (SALT2 2.4 when
    ``SNCOSMO_DATA_DIR`` holds it, else Bazin) | salt2 | bazin.
    Deterministic: the same arguments give byte-identical packets.
    """
    return list(iter_generate(n, seed, survey=survey, schema_version=schema_version, kind=kind,
                              start_jd=start_jd, cutout_bytes=cutout_bytes, sn_model=sn_model))


def stream(seed: int = 0, *, survey: str = "ztf", chunk: int = 500, start_jd: float | None = None,
           **kw: Any) -> Iterator[bytes]:
    """An endless deterministic stream: blocks of ``chunk`` alerts, each block starting one
    night after the previous one, with object and source ids never reused across blocks.
    Other keywords as for :func:`generate`. The first block equals ``generate(chunk, seed)``."""
    if chunk < 1:
        raise ValueError("chunk must be >= 1")
    start = DEFAULT_START_JD if start_jd is None else float(start_jd)
    block = 0
    while True:
        sch = None
        for i, (rec, schema) in enumerate(iter_records(chunk, seed, survey=survey, start_jd=start + block,
                                                       _block=block, **kw)):
            if sch is None:
                sch = json.dumps(schema)
            yield codec.encode(rec, sch, sync=_sync(seed, i, survey, block))
        block += 1


def write_dir(path: str | Path, n: int, seed: int = 0, **kw: Any) -> list[Path]:
    """Write :func:`generate` output as ``<objectId>.<sourceId>.<topic>.avro`` files."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    smap = load_map(kw.get("survey", "ztf"))
    paths = []
    for data in iter_generate(n, seed, **kw):
        rec = codec.decode(data)
        p = out / filename_for(rec, smap)
        p.write_bytes(data)
        paths.append(p)
    return paths


# =============================================================================================
# corrupt packets for bad-input tests
# =============================================================================================

CORRUPTIONS = (
    "empty",          # b""
    "garbage",        # random bytes, no magic
    "bad_magic",      # first 4 bytes changed
    "truncate",       # cut in the middle of the data block
    "truncate_header",  # cut inside the header
    "bad_sync",       # sync marker after the block altered
    "zero_records",   # valid header, no data block
    "two_records",    # the record twice in one container
    "bad_schema_json",  # header avro.schema is not JSON
    "wrong_schema",   # a valid container of an unrelated record type
    "nan_mag",        # valid packet, the source magnitude (or flux) is NaN
    "missing_field",  # valid packet whose schema lacks the source magnitude (or flux) field
)


def corrupt(data: bytes, how: str, smap: SchemaMap | str | None = None, *, seed: int = 0) -> bytes:
    """A broken (or semantically odd) variant of a good packet; ``how`` in :data:`CORRUPTIONS`.

    ``nan_mag`` and ``missing_field`` need the survey's map (guessed from the schema name when
    not given).
    """
    if how not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {how!r}; choose from {', '.join(CORRUPTIONS)}")
    if how == "empty":
        return b""
    if how == "garbage":
        return np.random.default_rng(seed).bytes(max(64, len(data) // 10))
    if how == "bad_magic":
        return b"Xbj\x02" + data[4:]
    c = codec._parse_container(data)
    if how == "truncate":
        count, start, end = c.blocks[0]
        return data[: start + (end - start) // 2]
    if how == "truncate_header":
        return data[: max(5, c.header_end // 2)]
    if how == "bad_sync":
        return data[:-codec.SYNC_SIZE] + bytes(b ^ 0xFF for b in data[-codec.SYNC_SIZE:])
    if how == "zero_records":
        return data[: c.header_end]
    if how == "bad_schema_json":
        meta = dict(c.meta)
        meta.pop("avro.schema")
        return codec._container_bytes("{not json", [(cnt, data[s:e]) for cnt, s, e in c.blocks], c.sync, meta)
    if how == "two_records":
        count, start, end = c.blocks[0]
        body = codec._decompress(c.codec, data[start:end])
        return codec._container_bytes(c.schema_text, [(2, codec._compress(c.codec, body + body))], c.sync, c.meta)
    if how == "wrong_schema":
        schema = {"type": "record", "name": "not_an_alert", "namespace": "pgbctl.test",
                  "fields": [{"name": "id", "type": "long"}, {"name": "note", "type": "string"}]}
        return codec.encode({"id": 42, "note": "not an alert packet"}, schema, sync=c.sync)
    # semantic corruptions: decode, alter, re-encode
    rec, schema = codec.decode_with_schema(data)
    if smap is None:
        from pgbctl.schemamap import for_schema_name

        smap = for_schema_name(codec.schema_fullname(schema))
    elif isinstance(smap, str):
        smap = load_map(smap)
    key = smap["mag"] if smap.get("mag") else smap["flux"]
    src_name = smap["source"]
    if how == "nan_mag":
        rec[src_name][key] = float("nan")
        return codec.encode(rec, schema, sync=c.sync)
    # missing_field: drop the field from the source record type and from the record
    sch = _Schema(schema)
    src_schema = sch.record_of(schema, src_name)
    src_schema["fields"] = [f for f in src_schema["fields"] if f["name"] != key]
    rec[src_name].pop(key, None)
    prv_schema = sch.record_of(schema, smap["prvSources"])
    if prv_schema is not None and prv_schema is not src_schema and any(f["name"] == key for f in prv_schema["fields"]):
        prv_schema["fields"] = [f for f in prv_schema["fields"] if f["name"] != key]
        for p in codec.get_path(rec, smap["prvSources"], []) or []:
            p.pop(key, None)
    elif prv_schema is src_schema:
        for p in codec.get_path(rec, smap["prvSources"], []) or []:
            p.pop(key, None)
    return codec.encode(rec, schema, sync=c.sync)
