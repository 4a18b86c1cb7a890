"""Survey-agnostic alert filters: purity and extragalactic transient.

Field names come from the survey's schema map (generic key -> survey field); thresholds come
from :class:`~pgbctl.science.config.FilterConfig`. A cut whose field the survey does not map is
SKIPPED (recorded in ``result.skipped``), so a survey that only maps ``rb`` is judged on ``rb``
alone -- no code here knows any survey by name.

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
    sc = cfg if isinstance(cfg, ScienceConfig) else ScienceConfig.default()
    survey = getattr(smap, "survey", None)
    if isinstance(survey, str) and survey in sc.surveys:
        sc = sc.for_survey(survey)
    return sc.filters


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
        ("rb", lambda x: x >= c.rb_min, "rb_low"),
        ("nbad", lambda x: x <= c.nbad_max, "nbad_nonzero"),
        ("fwhm", lambda x: x <= c.fwhm_max, "fwhm_high"),
        ("elong", lambda x: x <= c.elong_max, "elong_high"),
        ("magdiff", lambda x: abs(x) <= c.magdiff_abs_max, "magdiff_high"),
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
def positive_detection_times(alert: Mapping, smap: Any, cfg: FilterConfig | ScienceConfig | None = None) -> list[float]:
    """Times of the alert's positive detections (current + previous), de-duplicated and
    SORTED by time. Upper limits (null source id or null magnitude) are excluded; records
    with a null/NaN time are ignored."""
    c = _cfg(cfg, smap)
    src, prv = _records(alert, smap)
    t_name = _map_get(smap, "time")
    id_name = _map_get(smap, "sourceId")
    mag_name = _map_get(smap, "mag")
    sign_name = field_name(smap, "isdiffpos")
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
        if isinstance(mag_name, str):
            st, _ = _number(rec.get(mag_name))
            if st != _OK:
                continue
        if sign_name is not None and _is_positive(rec.get(sign_name), c) is not True:
            continue
        st, t = _number(rec.get(t_name))
        if st != _OK:
            continue
        times.append(t)
    times.sort()
    return times


def is_extragalactic_transient(
    alert: Mapping, smap: Any, cfg: FilterConfig | ScienceConfig | None = None
) -> FilterResult:
    """Positive subtraction; no point-source counterpart; not moving; no known solar-system
    object. Cuts on unmapped fields are skipped; the "moving" cut needs the sign (isdiffpos)
    and time fields."""
    c = _cfg(cfg, smap)
    src, _ = _records(alert, smap)
    if src is None:
        return FilterResult(False, ["no_source"])
    res = FilterResult(passed=True)

    # 1. positive subtraction
    name = field_name(smap, "isdiffpos")
    if "isdiffpos" not in c.exgal_cuts:
        pass
    elif name is None:
        res.skipped.append("isdiffpos")
    else:
        v = _lookup(alert, src, name)
        pos = _is_positive(v, c)
        if pos is None:
            res.reasons.append(f"{'null' if v is None else 'nan'}:isdiffpos")
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
                far = d < 0 or d > c.point_source_dist_max  # negative: "none" sentinel
            else:
                why.append(f"{st}:distpsnr1")
        else:
            res.skipped.append("distpsnr1")
        galaxy = None
        if s_name is not None:
            st, s = _number(_lookup(alert, src, s_name))
            if st == _OK:
                galaxy = s < c.point_source_sg_min
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

    # 3. not moving: >= N positive detections spanning >= span (sorted by time). The cut is
    #    defined on POSITIVE detections, so it needs the sign field as well as the time field.
    if "moving" not in c.exgal_cuts:
        pass
    elif field_name(smap, "isdiffpos") is None or not isinstance(_map_get(smap, "time"), str):
        res.skipped.append("moving")
    else:
        times = positive_detection_times(alert, smap, c)
        if len(times) < c.moving_min_detections:
            res.reasons.append("single_detection")
        elif (times[-1] - times[0]) * 1440.0 < c.moving_min_span_minutes:
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
            if 0 <= d <= c.ss_dist_max:
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
