"""Typed, immutable configuration of the value-added science stage.

Three frozen dataclasses with defaults:

* :class:`FilterConfig` -- thresholds of the purity and extragalactic-transient filters;
* :class:`Salt2Config` -- quality gate and SALT2 fit settings;
* :class:`ScienceConfig` -- both, plus per-survey overrides held as DATA.

Every class has ``from_dict`` / ``to_dict`` / ``replace(**kw)``; :class:`ScienceConfig` also
``from_yaml(text, survey=...)``. Unknown keys are refused (a typo must not silently fall back
to a default). Per-survey thresholds live in the ``surveys:`` mapping of the YAML/dict -- code
never branches on a survey's name::

    filters:
      rb_min: 0.65
    salt2:
      min_detections: 5
    surveys:
      somesurvey:
        filters: {rb_min: 0.6}
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = [
    "ConfigError",
    "FilterConfig",
    "Salt2Config",
    "ScienceConfig",
    "load_config",
    "DEFAULT_YAML",
    "PURITY_CUTS",
    "EXGAL_CUTS",
]


PURITY_CUTS = ("rb", "nbad", "fwhm", "elong", "magdiff")
EXGAL_CUTS = ("isdiffpos", "point_source", "moving", "ssdistnr")

# Shipped defaults, as data. Per-survey blocks select the cuts that mean something for a
# survey. DECam (DECAT): purity on rb alone (its fwhm is in other pixels and often null) and
# no moving-object cut (the broker's contract: DECAT, lacking ZTF's extragalactic fields,
# passes that filter unless its sign or catalogue fields say otherwise). Edit here, or
# override in the deployment's YAML, to change that.
DEFAULT_YAML = """
filters: {}
salt2: {}
surveys:
  decat:
    filters:
      purity_cuts: [rb]
      exgal_cuts: [isdiffpos, point_source, ssdistnr]
"""


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


def _coerce(cls, name: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of ``default`` (YAML gives lists for tuples, ints for
    floats)."""
    try:
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise TypeError("expected true/false")
            return value
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError("expected an integer")
            return int(value)
        if isinstance(default, float):
            if isinstance(value, bool):
                raise TypeError("expected a number")
            v = float(value)
            if math.isnan(v):
                raise TypeError("NaN is not a threshold")
            return v
        if isinstance(default, tuple):
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise TypeError("expected a list")
            items = tuple(value)
            if default and all(isinstance(d, float) for d in default):
                items = tuple(float(v) for v in items)
            return items
        if isinstance(default, str):
            if not isinstance(value, str):
                raise TypeError("expected a string")
            return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}.{name}: bad value {value!r} ({e})") from None
    return value


class _Base:
    """from_dict / to_dict / replace for a flat frozen dataclass."""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, **kw):
        d = dict(d or {}, **kw)
        return cls().replace(**d)

    def replace(self, **kw):
        names = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(kw) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown {type(self).__name__} key(s): {', '.join(unknown)}; "
                f"known: {', '.join(names)}"
            )
        vals = {k: _coerce(type(self), k, v, getattr(self, k)) for k, v in kw.items()}
        return dataclasses.replace(self, **vals)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class FilterConfig(_Base):
    """Thresholds of :func:`pgbctl.science.filters.is_pure` and
    :func:`~pgbctl.science.filters.is_extragalactic_transient`.

    A cut whose field the survey's schema map does not name is skipped (not failed).
    """

    # which cuts run (generic keys / cut names); per-survey overrides go in config data
    purity_cuts: tuple = ("rb", "nbad", "fwhm", "elong", "magdiff")
    exgal_cuts: tuple = ("isdiffpos", "point_source", "moving", "ssdistnr")
    # --- purity ---
    rb_min: float = 0.65  # real/bogus score >= this
    nbad_max: int = 0  # bad pixels within 5x5 <= this (0: none allowed)
    fwhm_max: float = 5.0  # FWHM [pixel] <= this
    elong_max: float = 1.2  # elongation <= this
    magdiff_abs_max: float = 0.1  # |aperture mag - PSF mag| <= this
    # --- extragalactic transient ---
    # isdiffpos values meaning "positive subtraction" (compared as lower-case strings;
    # booleans and the number 1 are accepted too)
    positive_values: tuple = ("t", "1", "true")
    point_source_dist_max: float = 1.5  # PS1 counterpart closer than this [arcsec] ...
    point_source_sg_min: float = 0.5  # ... with star/galaxy score >= this -> point source
    moving_min_detections: int = 2  # positive detections needed ...
    moving_min_span_minutes: float = 30.0  # ... spanning at least this long
    ss_dist_max: float = 5.0  # known solar-system object within this [arcsec] -> reject

    def __post_init__(self):
        for name, known in (("purity_cuts", PURITY_CUTS), ("exgal_cuts", EXGAL_CUTS)):
            bad = [x for x in getattr(self, name) if x not in known]
            if bad:
                raise ConfigError(f"FilterConfig.{name}: unknown cut(s) {bad}; known: {known}")
        if self.moving_min_detections < 1:
            raise ConfigError("FilterConfig.moving_min_detections must be >= 1")
        object.__setattr__(
            self, "positive_values", tuple(str(v).strip().lower() for v in self.positive_values)
        )


@dataclass(frozen=True)
class Salt2Config(_Base):
    """Quality gate and fit settings of :mod:`pgbctl.science.salt2`."""

    # --- quality gate (on detections) ---
    min_snr: float = 5.0  # max S/N over detections >= this
    min_detections: int = 5  # number of detections >= this
    min_dof: int = 1  # detections - 5 fitted parameters >= this (0: no such check)
    # --- model ---
    model_name: str = "salt2"
    model_version: str = "2.4"
    # --- bounds ---
    z_bounds: tuple = (0.01, 0.2)
    x1_bounds: tuple = (-5.0, 5.0)
    c_bounds: tuple = (-5.0, 5.0)
    t0_before_first_days: float = 20.0  # t0 >= first detection - this
    t0_after_last_days: float = 5.0  # t0 <= last detection + this
    # --- minimiser ---
    maxcall: int = 5000  # MIGRAD call budget (sncosmo's default is 10000)
    strategy: int = 0  # Minuit strategy of the profiled MIGRAD (errors come from the Hessian)
    z_starts: tuple = (0.15, 0.5, 0.85)  # global search starts, as fractions of the z range
    coarse_spacing: float = 20.0  # [A] integration grid of the global search (0: exact)
    guess_minsnr: float = 3.0  # points with S/N >= this pick the peak-flux epoch (t0 start)

    def __post_init__(self):
        for name in ("z_bounds", "x1_bounds", "c_bounds"):
            b = getattr(self, name)
            if len(b) != 2 or not (float(b[0]) < float(b[1])):
                raise ConfigError(f"Salt2Config.{name} must be [low, high] with low < high")
            object.__setattr__(self, name, (float(b[0]), float(b[1])))
        if self.z_bounds[0] < 0:
            raise ConfigError("Salt2Config.z_bounds must be >= 0")
        if not self.z_starts or not all(0.0 <= float(f) <= 1.0 for f in self.z_starts):
            raise ConfigError("Salt2Config.z_starts: fractions of the z range in [0, 1]")
        object.__setattr__(self, "z_starts", tuple(float(f) for f in self.z_starts))
        if self.coarse_spacing < 0:
            raise ConfigError("Salt2Config.coarse_spacing must be >= 0")
        if self.min_dof < 0:
            raise ConfigError("Salt2Config.min_dof must be >= 0")
        if self.min_detections < 1 or self.maxcall < 10 or self.strategy not in (0, 1, 2):
            raise ConfigError("Salt2Config: min_detections >= 1, maxcall >= 10, strategy 0-2")

    @property
    def model_label(self) -> str:
        """``'salt2 v2.4'``."""
        return f"{self.model_name} v{self.model_version}"


@dataclass(frozen=True)
class ScienceConfig:
    """Filters + SALT2 settings, and per-survey overrides kept as data."""

    filters: FilterConfig = field(default_factory=FilterConfig)
    salt2: Salt2Config = field(default_factory=Salt2Config)
    surveys: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    _SECTIONS = ("filters", "salt2")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None, survey: str | None = None):
        """Defaults <- top-level sections of ``d`` <- ``d['surveys'][survey]`` (if any)."""
        d = dict(d or {})
        unknown = sorted(set(d) - {*cls._SECTIONS, "surveys"})
        if unknown:
            raise ConfigError(
                f"unknown config section(s): {', '.join(unknown)}; known: filters, salt2, surveys"
            )
        surveys = d.get("surveys") or {}
        if not isinstance(surveys, Mapping):
            raise ConfigError("'surveys' must be a mapping of survey -> sections")
        cfg = cls(
            filters=FilterConfig.from_dict(_section(d, "filters")),
            salt2=Salt2Config.from_dict(_section(d, "salt2")),
            surveys={str(k): dict(v or {}) for k, v in surveys.items()},
        )
        # validate every survey block now, not when that survey first shows up
        for name in cfg.surveys:
            cfg._apply(name)
        return cfg._apply(survey) if survey is not None else cfg

    @classmethod
    def from_yaml(cls, text: str, survey: str | None = None):
        import yaml

        try:
            d = yaml.safe_load(text) if text and text.strip() else {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config is not valid YAML: {e}") from e
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ConfigError("config YAML must be a mapping")
        return cls.from_dict(d, survey=survey)

    @classmethod
    def default(cls) -> "ScienceConfig":
        """The shipped defaults (:data:`DEFAULT_YAML`, per-survey blocks included)."""
        return _default_config()

    def for_survey(self, survey: str) -> "ScienceConfig":
        """This config with ``survey``'s overrides applied (no overrides: unchanged)."""
        return self._apply(survey)

    def _apply(self, survey: str) -> "ScienceConfig":
        block = self.surveys.get(survey) or {}
        if not isinstance(block, Mapping):
            raise ConfigError(f"surveys.{survey} must be a mapping")
        unknown = sorted(set(block) - set(self._SECTIONS))
        if unknown:
            raise ConfigError(f"surveys.{survey}: unknown section(s) {', '.join(unknown)}")
        return dataclasses.replace(
            self,
            filters=self.filters.replace(**_section(block, "filters")),
            salt2=self.salt2.replace(**_section(block, "salt2")),
        )

    def replace(self, **kw) -> "ScienceConfig":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict[str, Any]:
        return {
            "filters": self.filters.to_dict(),
            "salt2": self.salt2.to_dict(),
            "surveys": {k: dict(v) for k, v in self.surveys.items()},
        }


def _section(d: Mapping[str, Any], name: str) -> dict[str, Any]:
    s = d.get(name) or {}
    if not isinstance(s, Mapping):
        raise ConfigError(f"config section {name!r} must be a mapping")
    return dict(s)


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``over`` wins; mappings are merged, everything else replaced."""
    out = dict(base)
    for k, v in (over or {}).items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def default_dict() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(DEFAULT_YAML) or {}


@functools.lru_cache(maxsize=1)
def _default_config() -> "ScienceConfig":
    return ScienceConfig.from_dict(default_dict())


def load_config(text: str | None = None, survey: str | None = None) -> ScienceConfig:
    """Shipped defaults (:data:`DEFAULT_YAML`), overridden by YAML ``text`` (if any), with the
    block for ``survey`` applied (if given)."""
    import yaml

    user = {}
    if text and text.strip():
        try:
            user = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config is not valid YAML: {e}") from e
        if not isinstance(user, Mapping):
            raise ConfigError("config YAML must be a mapping")
    return ScienceConfig.from_dict(_merge(default_dict(), user), survey=survey)
