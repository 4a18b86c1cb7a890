"""Schema maps: one YAML per survey, mapping pgbctl's generic names to the survey's field names.

A map is pure data (``pgbctl/schema_maps/<survey>.yaml``); processing code never names a survey,
it asks the map. Adding a survey (e.g. Rubin/LSST) means adding a YAML file.

Key conventions (documented at the top of ``ztf.yaml``):

* ``UPPER_CASE`` keys describe the survey: ``SURVEY``, ``SCHEMA_VERSIONS``, ``TOPIC_SYNTAX``,
  ``FILTER_MAP`` (survey filter value → generic letter), ``SNCOSMO_BANDS`` (generic letter →
  sncosmo bandpass), optional ``FILTER_REGEX``, ``FLUX_ZP``, ``ZPSYS``, ``SCHEMA_NAME``,
  ``SCHEMA_VERSION_REGEX``, ``SCHEMA_DOC``, ``AVRO_SCHEMAS``.
* alert-level keys are paths from the alert root (a dot descends into a record):
  ``objectId``, ``source``, ``prvSources``, ``forcedSources``, ``schemavsn``, ``cutouts``
  (``{location: alert|source, fields: [...]}``).
* source-level keys are field names inside one source record: ``sourceId``, ``filter``, ``mag``,
  ``magerr``, ``magzp``, ``time`` (+ ``time_format`` jd|mjd), ``ra``, ``dec``, ``isdiffpos``,
  ``flux``, ``fluxerr``, ``upper_limit`` (``{rule: null_source_id, limmag: <field>}``) and the
  ``fields`` sub-map (rb, nbad, fwhm, ...) that filters read.

``smap[key]`` looks a generic key up among the top-level keys, then in ``fields``.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import yaml

from pgbctl.paths import SCHEMA_MAPS_DIR

__all__ = ["SchemaMap", "SchemaMapError", "load", "available", "for_schema_name", "REQUIRED_KEYS"]

#: keys every map must define with a non-null value
REQUIRED_KEYS: tuple[str, ...] = (
    "SURVEY",
    "SCHEMA_VERSIONS",
    "TOPIC_SYNTAX",
    "FILTER_MAP",
    "SNCOSMO_BANDS",
    "objectId",
    "sourceId",
    "source",
    "prvSources",
    "filter",
    "time",
    "time_format",
    "ra",
    "dec",
    "cutouts",
)
#: keys that must be present (a null value means "the survey does not have it")
PRESENT_KEYS: tuple[str, ...] = ("schemavsn", "isdiffpos", "upper_limit", "mag", "magerr", "magzp")

_TIME_FORMATS = ("jd", "mjd")
_CUTOUT_LOCATIONS = ("alert", "source")
_UPPER_LIMIT_RULES = ("null_source_id",)


class SchemaMapError(ValueError):
    """A schema map is missing, unknown or invalid. The message lists every problem at once."""


def _problems(d: Any) -> list[str]:
    if not isinstance(d, dict):
        return [f"top level must be a mapping, got {type(d).__name__}"]
    probs: list[str] = []
    missing = [k for k in REQUIRED_KEYS if d.get(k) is None]
    if missing:
        probs.append("missing required keys: " + ", ".join(missing))
    absent = [k for k in PRESENT_KEYS if k not in d]
    if absent:
        probs.append("keys must be present (null if the survey lacks them): " + ", ".join(absent))
    sv = d.get("SCHEMA_VERSIONS")
    if sv is not None and (
        not isinstance(sv, list) or not sv or not all(isinstance(v, str) for v in sv)
    ):
        probs.append("SCHEMA_VERSIONS must be a non-empty list of quoted strings (e.g. \"3.3\")")
    if d.get("time_format") is not None and d["time_format"] not in _TIME_FORMATS:
        probs.append(f"time_format must be one of {_TIME_FORMATS}, got {d['time_format']!r}")
    fm, sb = d.get("FILTER_MAP"), d.get("SNCOSMO_BANDS")
    if fm is not None and not isinstance(fm, dict):
        probs.append("FILTER_MAP must be a mapping")
    if sb is not None and not isinstance(sb, dict):
        probs.append("SNCOSMO_BANDS must be a mapping")
    if isinstance(fm, dict) and isinstance(sb, dict):
        nob = sorted({str(v) for v in fm.values()} - {str(k) for k in sb})
        if nob:
            probs.append("FILTER_MAP letters without an SNCOSMO_BANDS entry: " + ", ".join(nob))
    cut = d.get("cutouts")
    if cut is not None:
        if (
            not isinstance(cut, dict)
            or cut.get("location") not in _CUTOUT_LOCATIONS
            or not isinstance(cut.get("fields"), list)
        ):
            probs.append(
                "cutouts must be {location: alert|source, fields: [field, ...]}, got " + repr(cut)
            )
    ul = d.get("upper_limit")
    if ul is not None and (not isinstance(ul, dict) or ul.get("rule") not in _UPPER_LIMIT_RULES):
        probs.append(f"upper_limit must be null or {{rule: {'|'.join(_UPPER_LIMIT_RULES)}, limmag: field}}")
    has_mag = all(d.get(k) is not None for k in ("mag", "magerr", "magzp"))
    has_flux = all(d.get(k) is not None for k in ("flux", "fluxerr")) and d.get("FLUX_ZP") is not None
    if not (has_mag or has_flux):
        probs.append("photometry: map mag, magerr and magzp, or flux, fluxerr and FLUX_ZP")
    if d.get("fields") is not None and not isinstance(d.get("fields"), dict):
        probs.append("fields must be a mapping of generic name -> survey field")
    for rx in ("FILTER_REGEX", "SCHEMA_NAME", "SCHEMA_VERSION_REGEX"):
        if d.get(rx) is not None:
            try:
                re.compile(d[rx])
            except re.error as e:
                probs.append(f"{rx} is not a valid regex: {e}")
    return probs


class SchemaMap(Mapping[str, Any]):
    """An immutable schema map. ``smap["mag"]`` → ``"magpsf"`` (for ZTF).

    Lookup order: top-level keys, then the ``fields`` sub-map. ``KeyError`` names the survey.
    """

    __slots__ = ("_d", "_survey", "_filter_rx", "_filter_map", "_hash")

    def __init__(self, data: dict, *, origin: str = "<dict>") -> None:
        probs = _problems(data)
        if probs:
            survey = data.get("SURVEY", "?") if isinstance(data, dict) else "?"
            raise SchemaMapError(f"invalid schema map {survey!r} ({origin}): " + "; ".join(probs))
        object.__setattr__(self, "_d", copy.deepcopy(data))
        object.__setattr__(self, "_survey", str(data["SURVEY"]))
        rx = data.get("FILTER_REGEX")
        object.__setattr__(self, "_filter_rx", re.compile(rx) if rx else None)
        # FILTER_MAP keys may be ints in YAML (ZTF fid) or strings; index both forms
        fmap: dict = {}
        for k, v in data["FILTER_MAP"].items():
            fmap[k] = str(v)
            fmap[str(k)] = str(v)
        object.__setattr__(self, "_filter_map", fmap)
        object.__setattr__(self, "_hash", None)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("SchemaMap is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("SchemaMap is immutable")

    # ---- mapping protocol -----------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        if key in self._d:
            return copy.deepcopy(self._d[key]) if isinstance(self._d[key], (dict, list)) else self._d[key]
        fields = self._d.get("fields") or {}
        if key in fields:
            return fields[key]
        raise KeyError(f"schema map {self._survey!r} has no key {key!r}")

    def __contains__(self, key: object) -> bool:
        return key in self._d or key in (self._d.get("fields") or {})

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SchemaMap) and self._d == other._d

    def __hash__(self) -> int:
        if self._hash is None:
            object.__setattr__(self, "_hash", hash((self._survey, self.to_yaml())))
        return self._hash

    def __repr__(self) -> str:
        return f"SchemaMap({self._survey!r})"

    # ---- accessors -------------------------------------------------------------------------
    @property
    def survey(self) -> str:
        return self._survey

    @property
    def raw(self) -> dict:
        """A deep copy of the map as a plain dict."""
        return copy.deepcopy(self._d)

    @property
    def fields(self) -> dict:
        return dict(self._d.get("fields") or {})

    @property
    def schema_versions(self) -> list[str]:
        return list(self._d["SCHEMA_VERSIONS"])

    def generic_filter(self, value: Any) -> str | None:
        """Generic filter letter for a survey filter value (``2`` → ``"r"``), None if unknown."""
        if value is None:
            return None
        if self._filter_rx is not None:
            m = self._filter_rx.search(str(value))
            if not m:
                return None
            value = m.group(1) if m.groups() else m.group(0)
        try:
            return self._filter_map.get(value, self._filter_map.get(str(value)))
        except TypeError:  # unhashable junk
            return None

    def sncosmo_band(self, letter: str | None) -> str | None:
        if letter is None:
            return None
        return (self._d["SNCOSMO_BANDS"] or {}).get(letter)

    def matches_schema_name(self, fullname: str) -> bool:
        rx = self._d.get("SCHEMA_NAME")
        return bool(rx) and re.search(rx, fullname) is not None

    # ---- serialisation ---------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self._d, sort_keys=False, allow_unicode=True)

    @classmethod
    def from_yaml(cls, text: str | bytes, *, origin: str = "<yaml text>") -> "SchemaMap":
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SchemaMapError(f"schema map ({origin}) is not valid YAML: {e}".replace("\n", " ")) from e
        return cls(data, origin=origin)

    @classmethod
    def from_file(cls, path: str | Path) -> "SchemaMap":
        p = Path(path)
        return cls.from_yaml(p.read_text(encoding="utf-8"), origin=str(p))


def available() -> list[str]:
    """Surveys with a schema map shipped in the package, sorted."""
    return sorted(p.stem for p in SCHEMA_MAPS_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def load(survey: str) -> SchemaMap:
    """The packaged schema map of ``survey`` (cached). Unknown survey → :class:`SchemaMapError`."""
    path = SCHEMA_MAPS_DIR / f"{survey}.yaml"
    if not isinstance(survey, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", survey) or not path.is_file():
        raise SchemaMapError(
            f"unknown survey {survey!r}: no schema map; known surveys: {', '.join(available())}"
        )
    smap = SchemaMap.from_file(path)
    if smap.survey != survey:
        raise SchemaMapError(f"schema map {path.name} declares SURVEY {smap.survey!r}, expected {survey!r}")
    return smap


def for_schema_name(fullname: str) -> SchemaMap:
    """The packaged map whose ``SCHEMA_NAME`` regex matches an Avro record full name."""
    hits = [s for s in available() if load(s).matches_schema_name(fullname)]
    if len(hits) != 1:
        raise SchemaMapError(
            f"{'no' if not hits else 'several'} schema maps match Avro schema {fullname!r}"
            + (f": {', '.join(hits)}" if hits else f"; known surveys: {', '.join(available())}")
        )
    return load(hits[0])
