"""Survey-agnostic alert filters: purity and extragalactic transient.

Field names come from the survey's schema map (generic key -> survey field); thresholds come
from :class:`~pgbctl.science.config.FilterConfig`. A cut whose field the survey does not map is
SKIPPED (recorded in ``result.skipped``), so a survey that only maps ``rb`` is judged on ``rb``
alone -- no code here knows any survey by name. Which cuts run at all is config DATA
(``purity_cuts`` / ``exgal_cuts``, with per-survey blocks: see ``config.DEFAULT_YAML``); given a
``ScienceConfig`` (or None: the shipped defaults) the block of ``smap.survey`` is applied.

Sign of the subtraction: ``isdiffpos`` ('t', '1', true, 1) if mapped, else the sign of ``flux``.
Thresholds are inclusive at float32 resolution (alert fields are 32-bit floats).

Every filter returns a :class:`FilterResult` (``passed``, ``reasons``). All cuts are evaluated
(not just up to the first failure) so that reasons can be counted. A null, NaN or non-numeric
field never raises: the cut fails with reason ``null:<key>``, ``nan:<key>`` or
``invalid:<key>`` (``<key>`` is the generic key, e.g. ``null:rb``), except where a null value
has a defined meaning (no PS1 counterpart, no known solar-system object).

Reason codes
------------
purity:  ``rb_low``, ``nbad_nonzero``, ``fwhm_high``, ``elong_high``, ``magdiff_high``
exgal:   ``negative_subtraction``, ``point_source``, ``single_detection`` (fewer positive
         detections than needed to tell it is not moving), ``moving`` (enough detections but
         their time span is too short), ``solar_system``
any:     ``null:<key>``, ``nan:<key>``, ``invalid:<key>``, ``no_source`` (the alert has no
         current-detection record)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from pgbctl.science.config import FilterConfig, ScienceConfig

__all__ = [
    "FilterResult",
    "PURITY_KEYS",
    "EXGAL_KEYS",
    "REASON_CODES",
    "is_pure",
    "is_extragalactic_transient",
    "field_name",
    "positive_detection_times",
]

PURITY_KEYS = ("rb", "nbad", "fwhm", "elong", "magdiff")
EXGAL_KEYS = ("isdiffpos", "distpsnr1", "sgscore1", "ssdistnr")
REASON_CODES = (
    "rb_low",
    "nbad_nonzero",
    "fwhm_high",
    "elong_high",
    "magdiff_high",
    "negative_subtraction",
    "point_source",
    "single_detection",
    "moving",
    "solar_system",
    "no_source",
)

@dataclass
class FilterResult:
    """Outcome of one filter on one alert."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # generic keys the survey does not map

    def __bool__(self) -> bool:
        return self.passed


# ---- schema-map access ------------------------------------------------------------------------
def _map_get(smap: Any, key: str) -> Any:
    """``smap.get(key)`` that tolerates SchemaMap objects and plain dicts."""
    try:
        v = smap.get(key)
    except Exception:
        try:
            v = smap[key]
        except Exception:
            v = None
    return v


def field_name(smap: Any, key: str) -> str | None:
    """The survey's field name for generic key ``key`` (top level of the map, then its
    ``fields`` sub-map), or None if the survey does not map it."""
    v = _map_get(smap, key)
    if v is None and isinstance(smap, Mapping) and not hasattr(smap, "raw"):
        sub = smap.get("fields")  # plain-dict stand-in for a SchemaMap
        if isinstance(sub, Mapping):
            v = sub.get(key)
    return v if isinstance(v, str) and v else None


def _path(record: Any, path: Any) -> Any:
    """``record["a"]["b"]`` for path ``"a.b"``; a list of paths: first non-null wins."""
    if isinstance(path, (list, tuple)):
        for p in path:
            v = _path(record, p)
            if v is not None:
                return v
        return None
    if not isinstance(path, str) or not path:
        return None
    cur = record
    for part in path.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


def _records(alert: Mapping, smap: Any) -> tuple[Mapping | None, list[Mapping]]:
    src = _path(alert, _map_get(smap, "source"))
    prv = _path(alert, _map_get(smap, "prvSources"))
    src = src if isinstance(src, Mapping) else None
    prv = [p for p in (prv if isinstance(prv, (list, tuple)) else []) if isinstance(p, Mapping)]
    return src, prv


def _lookup(alert: Mapping, record: Mapping | None, name: str) -> Any:
    """Field ``name`` from the detection record; dotted names are paths from the alert root;
    a name the record lacks is looked up on the alert root (object-level fields)."""
    if "." in name:
        cur: Any = alert
        for part in name.split("."):
            if not isinstance(cur, Mapping):
                return None
            cur = cur.get(part)
        return cur
    if record is not None and name in record:
        return record[name]
    return alert.get(name)


_OK, _NULL, _NAN, _INVALID = "ok", "null", "nan", "invalid"


def _number(v: Any) -> tuple[str, float | None]:
    if v is None:
        return _NULL, None
    if isinstance(v, bool):
        return _INVALID, None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return _INVALID, None
    if math.isnan(x):
        return _NAN, None
    return _OK, x


# Alert fields are 32-bit floats: 0.65 arrives as 0.64999998. Thresholds are inclusive at
# float32 resolution, so a value that IS the threshold in the packet passes.
_F32_REL = 2.0**-23


def _tol(t: float) -> float:
    return 2.0 * _F32_REL * max(1.0, abs(t))


def _ge(x: float, t: float) -> bool:
    return x >= t - _tol(t)


def _le(x: float, t: float) -> bool:
    return x <= t + _tol(t)


def _is_positive(v: Any, cfg: FilterConfig) -> bool | None:
    """True/False for a sign-of-subtraction value; None if null/NaN."""
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        if isinstance(v, float) and math.isnan(v):
            return None
        return v == 1
    if isinstance(v, bytes):
        v = v.decode(errors="replace")
    return str(v).strip().lower() in cfg.positive_values


def _cfg(cfg: FilterConfig | ScienceConfig | None, smap: Any = None) -> FilterConfig:
    """A FilterConfig is used as given; a ScienceConfig (None: the shipped defaults) gets the
    block of the map's survey applied (looked up by name in config DATA)."""
    if isinstance(cfg, FilterConfig):
        return cfg
    survey = getattr(smap, "survey", None)
    if cfg is None:
        return _default_filters(survey if isinstance(survey, str) else None)
    if isinstance(survey, str) and survey in cfg.surveys:
        return cfg.for_survey(survey).filters
    return cfg.filters


@functools.lru_cache(maxsize=64)
def _default_filters(survey: str | None) -> FilterConfig:
    sc = ScienceConfig.default()
    return sc.for_survey(survey).filters if survey in sc.surveys else sc.filters


# ---- purity ------------------------------------------------------------------------------------
def is_pure(alert: Mapping, smap: Any, cfg: FilterConfig | ScienceConfig | None = None) -> FilterResult:
    """rb >= rb_min, nbad <= nbad_max, fwhm <= fwhm_max, elong <= elong_max,
    |magdiff| <= magdiff_abs_max -- each only if the survey maps the field."""
    c = _cfg(cfg, smap)
    src, _ = _records(alert, smap)
    res = FilterResult(passed=True)
    if src is None:
        return FilterResult(False, ["no_source"])
    cuts = (
        ("rb", lambda x: _ge(x, c.rb_min), "rb_low"),
        ("nbad", lambda x: _le(x, c.nbad_max), "nbad_nonzero"),
        ("fwhm", lambda x: _le(x, c.fwhm_max), "fwhm_high"),
        ("elong", lambda x: _le(x, c.elong_max), "elong_high"),
        ("magdiff", lambda x: _le(abs(x), c.magdiff_abs_max), "magdiff_high"),
    )
    for key, ok, code in cuts:
        if key not in c.purity_cuts:
            continue
        name = field_name(smap, key)
        if name is None:
            res.skipped.append(key)
            continue
        status, x = _number(_lookup(alert, src, name))
        if status != _OK:
            res.reasons.append(f"{status}:{key}")
        elif not ok(x):
            res.reasons.append(code)
    res.passed = not res.reasons
    return res


# ---- extragalactic transient ---------------------------------------------------------------------
def _sign_key(smap: Any) -> str | None:
    """Generic key that tells the sign of the subtraction: ``isdiffpos`` if the survey maps it,
    else ``flux`` (its sign), else None."""
    if field_name(smap, "isdiffpos") is not None:
        return "isdiffpos"
    if field_name(smap, "flux") is not None:
        return "flux"
    return None


def _sign(rec: Mapping, smap: Any, key: str, c: FilterConfig) -> tuple[str, bool | None]:
    """(status, positive) of a detection record: status ok/null/nan/invalid."""
    v = rec.get(field_name(smap, key))
    if key == "flux":
        st, x = _number(v)
        return st, (x > 0 if st == _OK else None)
    pos = _is_positive(v, c)
    if pos is None:
        return (_NULL if v is None else _NAN), None
    return _OK, pos


def positive_detection_times(alert: Mapping, smap: Any, cfg: FilterConfig | ScienceConfig | None = None) -> list[float]:
    """Times of the alert's positive detections (current + previous), de-duplicated by
    source id and SORTED by time. Upper limits (null source id, or no magnitude/flux) are
    excluded, as are records with a null/NaN time. Positive: by ``isdiffpos`` if the survey
    maps it, else by the sign of ``flux``, else every detection counts."""
    c = _cfg(cfg, smap)
    src, prv = _records(alert, smap)
    t_name = _map_get(smap, "time")
    id_name = _map_get(smap, "sourceId")
    phot_name = field_name(smap, "mag") or field_name(smap, "flux")
    skey = _sign_key(smap)
    if not isinstance(t_name, str):
        return []
    seen: set = set()
    times: list[float] = []
    for rec in ([src] if src is not None else []) + prv:
        if isinstance(id_name, str):
            sid = rec.get(id_name)
            if sid is None:
                continue  # upper limit
            if sid in seen:
                continue
            seen.add(sid)
        if phot_name is not None and _number(rec.get(phot_name))[0] != _OK:
            continue  # no measurement: not a detection
        if skey is not None and _sign(rec, smap, skey, c)[1] is not True:
            continue
        st, t = _number(rec.get(t_name))
        if st != _OK:
            continue
        times.append(t)
    times.sort()  # the system we re-create differenced UNSORTED times
    return times


def is_extragalactic_transient(
    alert: Mapping, smap: Any, cfg: FilterConfig | ScienceConfig | None = None
) -> FilterResult:
    """Positive subtraction; no point-source counterpart; not moving; no known solar-system
    object. A cut whose fields the survey does not map is skipped (``result.skipped``); the
    sign comes from ``isdiffpos`` or, failing that, from the sign of ``flux``."""
    c = _cfg(cfg, smap)
    src, _ = _records(alert, smap)
    if src is None:
        return FilterResult(False, ["no_source"])
    res = FilterResult(passed=True)
    skey = _sign_key(smap)

    # 1. positive subtraction
    if "isdiffpos" not in c.exgal_cuts:
        pass
    elif skey is None:
        res.skipped.append("isdiffpos")
    else:
        st, pos = _sign(src, smap, skey, c)
        if st != _OK:
            res.reasons.append(f"{st}:{skey}")
        elif not pos:
            res.reasons.append("negative_subtraction")

    # 2. no point-source counterpart: (distpsnr1 null / <0 / > max) OR sgscore1 < min
    d_name, s_name = field_name(smap, "distpsnr1"), field_name(smap, "sgscore1")
    if "point_source" not in c.exgal_cuts:
        pass
    elif d_name is None and s_name is None:
        res.skipped += ["distpsnr1", "sgscore1"]
    else:
        far, why = None, []
        if d_name is not None:
            st, d = _number(_lookup(alert, src, d_name))
            if st == _NULL:
                far = True  # no counterpart catalogued
            elif st == _OK:
                far = d < 0 or not _le(d, c.point_source_dist_max)  # negative: "none" sentinel
            else:
                why.append(f"{st}:distpsnr1")
        else:
            res.skipped.append("distpsnr1")
        galaxy = None
        if s_name is not None:
            st, s = _number(_lookup(alert, src, s_name))
            if st == _OK:
                galaxy = not _ge(s, c.point_source_sg_min)
            else:
                why.append(f"{st}:sgscore1")
        else:
            res.skipped.append("sgscore1")
        if not (far or galaxy):
            if far is False and galaxy is False:
                res.reasons.append("point_source")
            elif why:
                res.reasons += why
            else:  # one field unmapped, the other says "point source"
                res.reasons.append("point_source")

    # 3. not moving: >= N positive detections spanning >= span (SORTED by time)
    if "moving" not in c.exgal_cuts:
        pass
    elif not isinstance(_map_get(smap, "time"), str):
        res.skipped.append("moving")
    else:
        times = positive_detection_times(alert, smap, c)
        if len(times) < c.moving_min_detections:
            res.reasons.append("single_detection")
        elif not _ge((times[-1] - times[0]) * 1440.0, c.moving_min_span_minutes):
            res.reasons.append("moving")

    # 4. no known solar-system object: ssdistnr null, < 0 or > max
    name = field_name(smap, "ssdistnr")
    if "ssdistnr" not in c.exgal_cuts:
        pass
    elif name is None:
        res.skipped.append("ssdistnr")
    else:
        st, d = _number(_lookup(alert, src, name))
        if st == _OK:
            if d >= 0 and _le(d, c.ss_dist_max):
                res.reasons.append("solar_system")
        elif st != _NULL:
            res.reasons.append(f"{st}:ssdistnr")

    res.passed = not res.reasons
    return res


def count_reasons(results: Iterable[FilterResult]) -> dict[str, int]:
    """``{reason: count}`` over many results (for monitoring)."""
    out: dict[str, int] = {}
    for r in results:
        for code in r.reasons:
            out[code] = out.get(code, 0) + 1
    return out
