"""SALT2 (v2.4) light-curve fits for the value-added stage.

Typical worker use::

    model = load_model(cfg)                 # once, at start: raises ModelDataError if the
                                            # SALT2 files are missing (one clear message)
    lc = prepare(alert, smap)               # detections only, sorted, flux from mag (AB zp)
    gate = quality_gate(lc, cfg)            # max S/N >= 5 and >= 5 detections
    if gate.passed:
        res = fit(lc, cfg, object_id=..., candid=...)   # never raises per alert
        row = res.to_row()                  # BigQuery `salt2` row (NaN -> None)
        png = plot_png(lc, res)

The fit minimises the same chi^2 as ``sncosmo.fit_lc`` (photometric errors only, no model
covariance; z, t0, x0, x1, c free; z in [0.01, 0.2], x1 and c in [-5, 5]; t0 in
[first detection - 20 d, last detection + 5 d]) with iminuit's MIGRAD (+ HESSE), but faster:

* the model is loaded once per process and only read afterwards (no per-fit Model copies);
* synthetic photometry is done directly on the SALT2 components with per-band integration
  grids, transmissions and zero points precomputed once per light curve; the M0/M1 surfaces
  are re-interpolated only when z or t0 change, the colour law only when z or c change, so
  MIGRAD's steps in x0/x1/c cost a dot product;
* a better start point: t0 at the epoch of peak flux, z from a small grid, x0 from the
  analytic least-squares amplitude.

:func:`plain_fit` is the straightforward ``sncosmo.fit_lc`` reference used by the benchmark.
"""

from __future__ import annotations

import io
import math
import threading
import time as _time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from pgbctl.science import sncosmo_data
from pgbctl.science.config import Salt2Config, ScienceConfig
from pgbctl.science.filters import FilterResult
from pgbctl.science.sncosmo_data import ModelDataError

__all__ = [
    "PARAM_NAMES",
    "ModelDataError",
    "Salt2Result",
    "load_model",
    "prepare",
    "as_table",
    "quality_gate",
    "fit",
    "fit_many",
    "fit_alert",
    "COV_PAIRS",
    "plain_fit",
    "model_for",
    "plot_png",
    "t0_bounds",
]

PARAM_NAMES = ("z", "t0", "x0", "x1", "c")
COV_PAIRS = tuple(
    (a, b) for i, a in enumerate(PARAM_NAMES) for b in PARAM_NAMES[i + 1 :]
)  # 10 off-diagonal entries, stable order

_LOCAL = threading.local()


def _s2cfg(cfg: Salt2Config | ScienceConfig | None) -> Salt2Config:
    if cfg is None:
        return Salt2Config()
    if isinstance(cfg, ScienceConfig):
        return cfg.salt2
    return cfg


# ---- model ---------------------------------------------------------------------------------------
def _source(cfg: Salt2Config):
    return sncosmo_data.load_source(cfg.model_name, cfg.model_version)


def load_model(cfg: Salt2Config | ScienceConfig | None = None, bands: Iterable[str] = ()):
    """The worker's ``sncosmo.Model`` (one per thread, reused). Call once at start.

    Raises :class:`ModelDataError` with one clear message if the model files (or a band in
    ``bands``) are not available offline; the failure is cached, so per-alert calls re-raise
    it at no cost instead of re-scanning the disk.
    """
    c = _s2cfg(cfg)
    src = _source(c)
    if bands:
        sncosmo_data.ensure_bandpasses(bands)
    key = (id(src),)
    m = getattr(_LOCAL, "models", {}).get(key)
    if m is None:
        import sncosmo

        m = sncosmo.Model(source=src)
        _LOCAL.__dict__.setdefault("models", {})[key] = m
    return m


def model_for(result: "Salt2Result", cfg: Salt2Config | ScienceConfig | None = None):
    """The worker's Model set to ``result``'s parameters (shared instance: use it at once)."""
    m = load_model(cfg)
    m.set(**{k: v for k, v in result.parameters.items() if v is not None and np.isfinite(v)})
    return m


# ---- light-curve input ---------------------------------------------------------------------------
_ALIASES = {
    "time": ("time", "mjd", "date", "jd"),
    "band": ("band", "bandpass", "filter"),
    "flux": ("flux", "f"),
    "fluxerr": ("fluxerr", "flux_err", "fluxerror", "df"),
    "zp": ("zp", "magzp"),
    "zpsys": ("zpsys", "magsys"),
}


@dataclass
class _LC:
    time: np.ndarray
    band: np.ndarray
    flux: np.ndarray
    fluxerr: np.ndarray
    zp: np.ndarray
    zpsys: np.ndarray

    def __len__(self) -> int:
        return len(self.time)

    def table(self):
        from astropy.table import Table

        return Table(
            {
                "time": self.time,
                "band": self.band,
                "flux": self.flux,
                "fluxerr": self.fluxerr,
                "zp": self.zp,
                "zpsys": self.zpsys,
            }
        )


def _column(cols: Mapping[str, Any], key: str):
    lower = {str(k).lower(): k for k in cols}
    for alias in _ALIASES[key]:
        if alias in lower:
            return cols[lower[alias]]
    return None


def _to_lc(lc: Any) -> _LC:
    """Normalise a light curve (codec LightCurve, astropy Table, dict of arrays) to sorted
    float/str arrays of DETECTIONS with finite flux and positive finite error."""
    if isinstance(lc, _LC):
        return lc
    if hasattr(lc, "detections") and hasattr(lc, "to_astropy"):
        lc = lc.detections().to_astropy()
    if hasattr(lc, "colnames"):  # astropy Table
        cols = {n: np.asarray(lc[n]) for n in lc.colnames}
    elif isinstance(lc, np.ndarray) and lc.dtype.names:
        cols = {n: lc[n] for n in lc.dtype.names}
    elif isinstance(lc, Mapping):
        cols = {k: np.asarray(v) for k, v in lc.items()}
    else:
        raise TypeError(f"cannot read a light curve from {type(lc).__name__}")
    missing = [k for k in ("time", "band", "flux", "fluxerr", "zp") if _column(cols, k) is None]
    if missing:
        raise ValueError(f"light curve lacks column(s): {', '.join(missing)}")
    time = np.asarray(_column(cols, "time"), dtype=float)
    n = len(time)
    band = np.asarray([str(b) for b in np.asarray(_column(cols, "band"))], dtype=object)
    flux = np.asarray(_column(cols, "flux"), dtype=float)
    fluxerr = np.asarray(_column(cols, "fluxerr"), dtype=float)
    zp = np.broadcast_to(np.asarray(_column(cols, "zp"), dtype=float), (n,))
    zs = _column(cols, "zpsys")
    zpsys = np.asarray(
        [str(s) for s in np.broadcast_to(np.asarray(zs if zs is not None else "ab"), (n,))],
        dtype=object,
    )
    keep = np.isfinite(time) & np.isfinite(flux) & np.isfinite(fluxerr) & (fluxerr > 0)
    keep &= np.isfinite(zp)
    det = cols.get("detected")
    if det is not None:
        keep &= np.asarray(det, dtype=bool)
    order = np.argsort(time[keep], kind="stable")  # SORT epochs by time before anything
    idx = np.flatnonzero(keep)[order]
    return _LC(time[idx], band[idx], flux[idx], fluxerr[idx], np.array(zp[idx]), zpsys[idx])


def as_table(lc: Any):
    """The light curve as the astropy Table the fit uses (detections, sorted by time)."""
    return _to_lc(lc).table()


def prepare(alert: Mapping, smap: Any):
    """Light curve of an alert for the fit: detections only (current + previous), sorted by
    time, flux from magnitude via the AB zero point (``pgbctl.codec``)."""
    from pgbctl import codec

    return as_table(codec.light_curve(alert, smap))


def quality_gate(lc: Any, cfg: Salt2Config | ScienceConfig | None = None) -> FilterResult:
    """Max S/N >= ``min_snr`` and at least ``min_detections`` detections.

    Reasons: ``few_detections``, ``snr_low``, ``bad_lightcurve`` (unreadable input)."""
    c = _s2cfg(cfg)
    try:
        d = _to_lc(lc)
    except Exception:
        return FilterResult(False, ["bad_lightcurve"])
    reasons = []
    if len(d) < c.min_detections:
        reasons.append("few_detections")
    if len(d) == 0 or not np.max(d.flux / d.fluxerr) >= c.min_snr:
        reasons.append("snr_low")
    return FilterResult(not reasons, reasons)


def t0_bounds(lc: Any, cfg: Salt2Config | ScienceConfig | None = None) -> tuple[float, float]:
    """[first detection - t0_before_first_days, last detection + t0_after_last_days]."""
    c = _s2cfg(cfg)
    d = _to_lc(lc)
    return float(d.time[0] - c.t0_before_first_days), float(d.time[-1] + c.t0_after_last_days)


# ---- result --------------------------------------------------------------------------------------
def _none_if_nan(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f if math.isfinite(f) else None


@dataclass
class Salt2Result:
    """One SALT2 fit. Parameters/errors are NaN when unavailable (None in :meth:`to_row`)."""

    success: bool
    message: str
    ncall: int = 0
    chisq: float = math.nan
    ndof: int = 0
    z: float = math.nan
    z_err: float = math.nan
    t0: float = math.nan
    t0_err: float = math.nan
    x0: float = math.nan
    x0_err: float = math.nan
    x1: float = math.nan
    x1_err: float = math.nan
    c: float = math.nan
    c_err: float = math.nan
    covariance: dict[str, float] = field(default_factory=dict)  # "cov_z_t0" -> value
    vparam_names: tuple[str, ...] = PARAM_NAMES
    model_name: str = "salt2"
    model_version: str = "2.4"
    object_id: Any = None
    candid: Any = None
    elapsed_s: float = 0.0

    @property
    def model(self) -> str:
        """``'salt2 v2.4'``."""
        return f"{self.model_name} v{self.model_version}"

    @property
    def parameters(self) -> dict[str, float]:
        return {p: getattr(self, p) for p in PARAM_NAMES}

    @property
    def errors(self) -> dict[str, float]:
        return {p: getattr(self, f"{p}_err") for p in PARAM_NAMES}

    def cov(self, a: str, b: str) -> float:
        """Covariance entry (either order; diagonal = error squared)."""
        if a == b:
            e = getattr(self, f"{a}_err")
            return e * e
        k = f"cov_{a}_{b}" if f"cov_{a}_{b}" in self.covariance else f"cov_{b}_{a}"
        return self.covariance.get(k, math.nan)

    def to_row(self, include_message: bool = False) -> dict[str, Any]:
        """A row of the BigQuery ``salt2`` table (JSON-safe; NaN -> None)."""
        row: dict[str, Any] = {
            "objectId": self.object_id,
            "candid": _none_if_nan(self.candid),
            "success": bool(self.success),
            "ncall": int(self.ncall),
            "chisq": _none_if_nan(self.chisq),
            "ndof": int(self.ndof),
        }
        for p in PARAM_NAMES:
            row[p] = _none_if_nan(getattr(self, p))
            row[f"{p}_err"] = _none_if_nan(getattr(self, f"{p}_err"))
        for a, b in COV_PAIRS:
            row[f"cov_{a}_{b}"] = _none_if_nan(self.covariance.get(f"cov_{a}_{b}"))
        row["model_name"] = self.model_name
        row["model_version"] = self.model_version
        if include_message:
            row["message"] = self.message
        return row


# ---- the fast chi^2 --------------------------------------------------------------------------------
_BAND_CACHE: dict[tuple[str, float], tuple] = {}
_ZP_CACHE: dict[tuple[str, str], float] = {}


def _band_setup(name: str, spacing: float):
    """(bandpass, wave grid, wave * trans * dwave / hc) -- sncosmo's integration, cached."""
    key = (name, spacing)
    hit = _BAND_CACHE.get(key)
    if hit is None:
        import sncosmo
        from sncosmo.constants import HC_ERG_AA
        from sncosmo.utils import integration_grid

        bp = sncosmo.get_bandpass(name)
        wave, dwave = integration_grid(bp.minwave(), bp.maxwave(), spacing)
        hit = (bp, wave, wave * bp(wave) * (dwave / HC_ERG_AA))
        _BAND_CACHE[key] = hit
    return hit


def _zpbandflux(name: str, zpsys: str) -> float:
    key = (name, zpsys)
    v = _ZP_CACHE.get(key)
    if v is None:
        import sncosmo

        v = float(sncosmo.get_magsystem(zpsys).zpbandflux(sncosmo.get_bandpass(name)))
        _ZP_CACHE[key] = v
    return v


class _Group:
    __slots__ = ("idx", "time", "bp", "wave", "w", "zpnorm")

    def __init__(self, idx, time, bp, wave, w, zpnorm):
        self.idx, self.time, self.bp, self.wave, self.w, self.zpnorm = idx, time, bp, wave, w, zpnorm


class _Salt2Chi2:
    """chi^2(z, t0, x0, x1, c) of a light curve against SALT2: the same numbers as
    ``sncosmo.fit_lc``'s objective (``Model.bandflux`` with zp/zpsys, sncosmo's integration
    grid unless ``spacing`` says otherwise), with caching:

    model flux = x0 * (u + x1 * v),  u, v = a * zpnorm * sum_lambda M0|M1(phase, rest wave)
    * w(lambda) * 10**(-0.4 c CL(rest wave)),  a = 1 / (1 + z).

    M0/M1 are re-interpolated only when (z, t0) change, the colour law only when z changes;
    a change of x0 or x1 costs nothing but a multiply-add, a change of c two dot products."""

    def __init__(self, source, lc: _LC, spacing: float | None = None):
        from sncosmo.constants import MODEL_BANDFLUX_SPACING

        spacing = float(MODEL_BANDFLUX_SPACING if spacing is None else spacing)
        self.m0 = source._model["M0"]
        self.m1 = source._model["M1"]
        self.colorlaw = source._colorlaw
        self.flux = lc.flux
        self.invvar = 1.0 / lc.fluxerr**2
        self.wflux = self.flux * self.invvar
        self.groups: list[_Group] = []
        for name in sorted(set(lc.band)):
            idx = np.flatnonzero(lc.band == name)
            bp, wave, w = _band_setup(name, spacing)
            zpnorm = 10.0 ** (0.4 * lc.zp[idx])
            for ms in set(lc.zpsys[idx]):
                m = lc.zpsys[idx] == ms
                zpnorm[m] = zpnorm[m] / _zpbandflux(name, ms)
            self.groups.append(_Group(idx, lc.time[idx], bp, wave, w, zpnorm))
        self.ncall = 0
        n = len(self.flux)
        self._u = np.empty(n)
        self._v = np.empty(n)
        self._zt = None  # (z, t0) of the cached M0/M1 surfaces
        self._M: list = []
        self._zcl = None  # z of the cached colour law
        self._CL: list = []
        self._ztc = None  # (z, t0, c) of the cached u, v

    def bands_outside(self, source, z_bounds) -> list[str]:
        """Bands whose rest-frame range leaves the model's somewhere in the z range."""
        return [
            g.bp.name
            for g in self.groups
            if g.bp.minwave() / (1 + z_bounds[1]) < source.minwave()
            or g.bp.maxwave() / (1 + z_bounds[0]) > source.maxwave()
        ]

    def basis(self, z: float, t0: float, c: float) -> tuple[np.ndarray, np.ndarray]:
        """(u, v): model flux = x0 * u + x0 * x1 * v (data order). Cached; do not modify."""
        key = (z, t0, c)
        if self._ztc == key:
            return self._u, self._v
        a = 1.0 / (1.0 + z)
        if self._zt != (z, t0):
            self._M = [
                (self.m0((g.time - t0) * a, g.wave * a), self.m1((g.time - t0) * a, g.wave * a))
                for g in self.groups
            ]
            self._zt = (z, t0)
        if self._zcl != z:
            self._CL = [-0.4 * self.colorlaw(g.wave * a) for g in self.groups]
            self._zcl = z
        u, v = self._u, self._v
        for g, (M0, M1), cl in zip(self.groups, self._M, self._CL):
            wcf = g.w * 10.0 ** (cl * c)
            s = a * g.zpnorm
            u[g.idx] = (M0 @ wcf) * s
            v[g.idx] = (M1 @ wcf) * s
        self._ztc = key
        return u, v

    def model_flux(self, p) -> np.ndarray:
        z, t0, x0, x1, c = (float(v) for v in p)
        u, v = self.basis(z, t0, c)
        return x0 * (u + x1 * v)

    def profile(self, z: float, t0: float, c: float, x1_bounds) -> tuple[float, float, float]:
        """(chi2, x0, x1) minimised analytically over x0 and x1 (x1 kept in bounds) at fixed
        (z, t0, c): the model is linear in (x0, x0 * x1)."""
        u, v = self.basis(z, t0, c)
        w = self.invvar
        wu = w * u
        suu, suv, svv = float(u @ wu), float(v @ wu), float(v @ (w * v))
        sfu, sfv = float(self.wflux @ u), float(self.wflux @ v)
        sff = float(self.wflux @ self.flux)
        det = suu * svv - suv * suv
        if det > 0:
            alpha = (sfu * svv - sfv * suv) / det
            beta = (suu * sfv - suv * sfu) / det
            if alpha > 0:
                x1 = beta / alpha
                if x1_bounds[0] <= x1 <= x1_bounds[1]:
                    # chi2 at the linear least-squares solution
                    return max(sff - alpha * sfu - beta * sfv, 0.0), alpha, x1
        # constrained: x1 on a bound (or the unconstrained amplitude is not positive)
        best = (math.inf, math.nan, math.nan)
        for x1b in (x1_bounds[0], 0.0, x1_bounds[1]):
            sgg = suu + 2 * x1b * suv + x1b * x1b * svv
            sfg = sfu + x1b * sfv
            if sgg > 0 and sfg > 0:
                chi = max(sff - sfg * sfg / sgg, 0.0)
                if chi < best[0]:
                    best = (chi, sfg / sgg, x1b)
        return best

    def __call__(self, p) -> float:
        self.ncall += 1
        r = self.flux - self.model_flux(p)
        v = float(np.dot(r * r, self.invvar))
        return v if math.isfinite(v) else math.inf


# colour values tried for the start point (x0, x1 are solved for analytically)
_C_GRID = (-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.45, 0.6)
_T0_OFFSETS = (-5.0, -2.5, 0.0, 2.5)


def _start_point(chi2: _Salt2Chi2, lc: _LC, c: Salt2Config, bounds: dict, z0: float):
    """(t0, c) start at redshift ``z0``: t0 around the epoch of PEAK FLUX (points with
    S/N >= guess_minsnr), c on a grid; x0 and x1 solved analytically at each node."""
    snr = lc.flux / lc.fluxerr
    sel = snr >= c.guess_minsnr
    if not np.any(sel):
        sel = np.ones(len(lc), bool)
    t_peak = float(lc.time[sel][np.argmax(lc.flux[sel])])
    lo_t, hi_t = bounds["t0"]
    t0s = sorted({min(max(t_peak + dt, lo_t), hi_t) for dt in _T0_OFFSETS})
    cs = [v for v in _C_GRID if bounds["c"][0] <= v <= bounds["c"][1]] or [0.0]
    best = None
    for t0 in t0s:
        for col in cs:
            chi, _, _ = chi2.profile(z0, t0, col, bounds["x1"])
            if math.isfinite(chi) and (best is None or chi < best[0]):
                best = (chi, t0, col)
    return None if best is None else (best[1], best[2])


def _profile_migrad(chi2: _Salt2Chi2, start, bounds: dict, c: Salt2Config, z_fixed, tol: float):
    """MIGRAD of the chi^2 profiled over (x0, x1), in (z, t0, c)."""
    from iminuit import Minuit

    x1b = bounds["x1"]

    def profiled(p):
        chi2.ncall += 1
        return chi2.profile(float(p[0]), float(p[1]), float(p[2]), x1b)[0]

    m3 = Minuit(profiled, list(start), name=("z", "t0", "c"))
    m3.errordef = Minuit.LEAST_SQUARES
    m3.strategy = c.strategy
    m3.print_level = 0
    m3.throw_nan = False
    m3.tol = tol
    m3.errors = [0.01, 1.0, 0.05]
    for p in ("z", "t0", "c"):
        m3.limits[p] = bounds[p]
    if z_fixed is not None:
        m3.fixed["z"] = True
    m3.migrad(ncall=c.maxcall)
    return m3


def _minimise(chi2: _Salt2Chi2, lc: _LC, c: Salt2Config, bounds: dict, z_fixed, src):
    """Global search, then the exact fit.

    1. On a coarse integration grid (``coarse_spacing`` A: ~3x cheaper, fluxes within 1e-3),
       MIGRAD of the chi^2 profiled over (x0, x1) -- analytic, the model is linear in x0 and
       x0*x1 -- in (z, t0, c) from each redshift in ``z_starts`` (the z-colour valley has
       several minima); keep the best.
    2. On sncosmo's exact grid, MIGRAD of the profile from there (a few steps), then HESSE of
       the full 5-parameter chi^2 for errors and covariance.
    Returns (5-d Minuit or None, FMin of the final profile MIGRAD or None).
    """
    from iminuit import Minuit

    lo, hi = bounds["z"]
    if z_fixed is not None:
        z_starts = [float(z_fixed)]
    else:
        z_starts = [lo + f * (hi - lo) for f in c.z_starts]
    coarse = _Salt2Chi2(src, lc, c.coarse_spacing) if c.coarse_spacing else chi2
    best = None
    for z0 in z_starts:
        st = _start_point(coarse, lc, c, bounds, z0)
        if st is None:
            continue
        m3 = _profile_migrad(coarse, (z0, st[0], st[1]), bounds, c, z_fixed, tol=1.0)
        if best is None or m3.fval < best.fval:
            best = m3
    chi2.ncall += coarse.ncall if coarse is not chi2 else 0
    if best is None:
        return None, None
    m3 = _profile_migrad(chi2, tuple(float(v) for v in best.values), bounds, c, z_fixed, tol=0.1)
    z, t0, col = (float(v) for v in m3.values)
    _, x0, x1 = chi2.profile(z, t0, col, bounds["x1"])
    if not (x0 > 0):
        return None, m3.fmin
    m = Minuit(chi2, [z, t0, x0, x1, col], name=PARAM_NAMES)
    m.errordef = Minuit.LEAST_SQUARES
    m.strategy = c.strategy
    m.print_level = 0
    m.throw_nan = False
    m.errors = [0.005, 0.3, 0.05 * x0, 0.1, 0.01]
    for p in ("z", "t0", "x1", "c"):
        m.limits[p] = bounds[p]
    if z_fixed is not None:
        m.fixed["z"] = True
    if c.hesse and m3.fmin.is_valid:
        m.hesse()
    return m, m3.fmin


class _Merged:
    """Status flags: convergence from the MIGRAD run, covariance from HESSE."""

    def __init__(self, migrad, hesse):
        self.has_reached_call_limit = migrad.has_reached_call_limit
        self.has_valid_parameters = migrad.has_valid_parameters
        self.hesse_failed = hesse.hesse_failed
        self.has_covariance = hesse.has_covariance
        self.has_accurate_covar = hesse.has_accurate_covar
        self.has_made_posdef_covar = hesse.has_made_posdef_covar


def _message(fmin, extra: list[str]) -> str:
    msg = []
    if fmin.has_reached_call_limit:
        msg.append("Reached call limit.")
    if fmin.hesse_failed:
        msg.append("Hesse failed.")
    if not fmin.has_covariance:
        msg.append("No covariance.")
    elif not fmin.has_accurate_covar:
        msg.append("Covariance may not be accurate.")
    if fmin.has_made_posdef_covar:
        msg.append("Covariance forced positive definite.")
    if not fmin.has_valid_parameters:
        msg.append("Parameter(s) value and/or error invalid.")
    msg += extra
    return " ".join(msg) if msg else "Minimization exited successfully."


def _failure(message: str, c: Salt2Config, object_id, candid, t_start, ncall=0, ndof=0):
    return Salt2Result(
        success=False,
        message=message,
        ncall=ncall,
        ndof=ndof,
        model_name=c.model_name,
        model_version=c.model_version,
        object_id=object_id,
        candid=candid,
        elapsed_s=_time.perf_counter() - t_start,
    )


def fit(
    lc: Any,
    cfg: Salt2Config | ScienceConfig | None = None,
    *,
    object_id: Any = None,
    candid: Any = None,
    z: float | None = None,
) -> Salt2Result:
    """Fit SALT2 (z, t0, x0, x1, c; or with ``z`` fixed) to a light curve.

    ``lc``: a codec ``LightCurve`` (its detections are used), or an astropy Table / dict with
    columns time (MJD), band (sncosmo name), flux, fluxerr, zp, zpsys. Rows are sorted by
    time first; non-finite rows are dropped. Never raises for a bad light curve or a failed
    fit (``success=False`` + ``message``); raises :class:`ModelDataError` only if the model
    itself cannot be loaded (a configuration error, reported once).
    """
    t_start = _time.perf_counter()
    c = _s2cfg(cfg)
    src = _source(c)  # ModelDataError propagates: configuration, not per-alert
    try:
        d = _to_lc(lc)
    except Exception as e:
        return _failure(f"bad light curve: {e}", c, object_id, candid, t_start)
    names = list(PARAM_NAMES) if z is None else [p for p in PARAM_NAMES if p != "z"]
    ndof = len(d) - len(names)
    if len(d) == 0 or ndof < 1:
        return _failure(f"too few points ({len(d)}) for {len(names)} parameters", c,
                        object_id, candid, t_start, ndof=ndof)
    try:
        sncosmo_data.ensure_bandpasses(set(d.band))
        chi2 = _Salt2Chi2(src, d)
    except ModelDataError as e:
        return _failure(str(e), c, object_id, candid, t_start, ndof=ndof)
    except Exception as e:
        return _failure(f"{type(e).__name__}: {e}", c, object_id, candid, t_start, ndof=ndof)
    zb = c.z_bounds if z is None else (z, z)
    bad = chi2.bands_outside(src, zb)
    if bad:
        return _failure(f"band(s) outside the model's wavelength range: {', '.join(bad)}",
                        c, object_id, candid, t_start, ndof=ndof)
    bounds = {"z": c.z_bounds, "t0": t0_bounds(d, c), "x1": c.x1_bounds, "c": c.c_bounds}
    try:
        m, fmin3 = _minimise(chi2, d, c, bounds, z, src)
    except Exception as e:  # iminuit / numerical failures
        return _failure(f"{type(e).__name__}: {e}", c, object_id, candid, t_start,
                        ncall=chi2.ncall, ndof=ndof)
    if m is None:
        return _failure("no usable start point (model flux is zero or negative at all epochs)"
                        if fmin3 is None else "fit diverged: no positive amplitude",
                        c, object_id, candid, t_start, ncall=chi2.ncall, ndof=ndof)
    fmin = m.fmin if (c.hesse and m.fmin is not None) else fmin3

    vals = {p: float(m.values[p]) for p in PARAM_NAMES}
    errs = {p: (float(m.errors[p]) if p in names else 0.0) for p in PARAM_NAMES}
    extra = []
    for p in ("z", "t0", "x1", "c"):
        if p in names and m.limits[p] is not None:
            lo, hi = m.limits[p]
            span = hi - lo
            if min(vals[p] - lo, hi - vals[p]) < 1e-4 * span:
                extra.append(f"{p} at bound.")
    cov: dict[str, float] = {}
    if m.covariance is not None:
        for a, b in COV_PAIRS:
            cov[f"cov_{a}_{b}"] = float(m.covariance[a, b]) if (a in names and b in names) else math.nan
    else:
        errs = {p: math.nan for p in PARAM_NAMES}
    success = bool(fmin3.is_valid) and (not c.hesse or (
        fmin is not None and fmin.has_covariance and fmin.has_posdef_covar))
    if not fmin3.is_valid:
        extra.insert(0, "Migrad did not converge (EDM above goal)." if not
                     fmin3.has_reached_call_limit else "")
    res = Salt2Result(
        success=success,
        message=_message(fmin3, [e for e in extra if e]) if not c.hesse or fmin is None
        else _message(_Merged(fmin3, fmin), [e for e in extra if e]),
        ncall=int(chi2.ncall),
        chisq=float(chi2(np.array([vals[p] for p in PARAM_NAMES]))),
        ndof=int(ndof),
        covariance=cov,
        vparam_names=tuple(names),
        model_name=c.model_name,
        model_version=c.model_version,
        object_id=object_id,
        candid=candid,
        **vals,
        **{f"{p}_err": errs[p] for p in PARAM_NAMES},
    )
    res.elapsed_s = _time.perf_counter() - t_start
    return res


def fit_many(tables: Iterable[Any], cfg: Salt2Config | ScienceConfig | None = None, **kw) -> list[Salt2Result]:
    """:func:`fit` over many light curves with the warm model."""
    c = _s2cfg(cfg)
    _source(c)
    return [fit(t, c, **kw) for t in tables]


def fit_alert(alert: Mapping, smap: Any, cfg: Salt2Config | ScienceConfig | None = None):
    """``(gate, result)``: the alert's light curve (codec), the quality gate, and the fit
    (``result`` is None when the gate fails). The extragalactic-transient filter is the
    caller's job. objectId / candid of the result come from the codec."""
    from pgbctl import codec

    c = _s2cfg(cfg)
    try:
        lc = codec.light_curve(alert, smap)
        table = as_table(lc)
    except Exception:
        return FilterResult(False, ["bad_lightcurve"]), None
    gate = quality_gate(table, c)
    if not gate.passed:
        return gate, None
    return gate, fit(table, c, object_id=lc.object_id, candid=lc.source_id_current)


# ---- the naive reference (benchmark) ------------------------------------------------------------
def plain_fit(lc: Any, cfg: Salt2Config | ScienceConfig | None = None) -> Salt2Result:
    """The straightforward way: a fresh ``sncosmo.Model`` and ``sncosmo.fit_lc`` with its
    defaults (minsnr=5, maxcall=10000, its own start guesses), same data and bounds as
    :func:`fit`. For the benchmark and for agreement tests."""
    import sncosmo

    t_start = _time.perf_counter()
    c = _s2cfg(cfg)
    table = as_table(lc)
    model = sncosmo.Model(source=_source(c))
    bounds = {"z": c.z_bounds, "t0": t0_bounds(table, c), "x1": c.x1_bounds, "c": c.c_bounds}
    try:
        r, _ = sncosmo.fit_lc(table, model, list(PARAM_NAMES), bounds=bounds)
    except Exception as e:
        return _failure(f"{type(e).__name__}: {e}", c, None, None, t_start)
    vals = dict(zip(r.param_names, (float(v) for v in r.parameters)))
    errs = {p: float(r.errors[p]) if r.errors is not None and p in r.errors else math.nan
            for p in PARAM_NAMES}
    cov = {}
    if r.covariance is not None:
        ix = {p: i for i, p in enumerate(r.vparam_names)}
        for a, b in COV_PAIRS:
            cov[f"cov_{a}_{b}"] = float(r.covariance[ix[a], ix[b]])
    return Salt2Result(
        success=bool(r.success),
        message=str(r.message),
        ncall=int(r.ncall),
        chisq=float(r.chisq),
        ndof=int(r.ndof),
        covariance=cov,
        model_name=c.model_name,
        model_version=c.model_version,
        elapsed_s=_time.perf_counter() - t_start,
        **{p: vals[p] for p in PARAM_NAMES},
        **{f"{p}_err": errs[p] for p in PARAM_NAMES},
    )


# ---- plot --------------------------------------------------------------------------------------
_BAND_COLORS = {"g": "#2ca02c", "r": "#d62728", "i": "#8c564b", "u": "#9467bd",
                "z": "#7f7f7f", "y": "#17becf", "b": "#1f77b4", "v": "#bcbd22"}


def _band_color(name: str, k: int) -> str:
    tail = name[-1:].lower()
    if tail in _BAND_COLORS:
        return _BAND_COLORS[tail]
    return f"C{k % 10}"


def plot_png(lc: Any, result: Salt2Result | None = None, *, dpi: int = 72,
             cfg: Salt2Config | ScienceConfig | None = None) -> bytes:
    """PNG of the light curve (flux normalised to zp=25 AB) with the fitted model.

    Uses a bare ``matplotlib.figure.Figure`` on the Agg canvas: nothing is registered with
    pyplot (no global figure list to leak into), and the figure is cleared in ``finally``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = _to_lc(lc)
    fig = Figure(figsize=(6.0, 4.0), dpi=dpi)
    try:
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        scale = 10.0 ** (-0.4 * (d.zp - 25.0))  # to zp = 25 (same zpsys)
        have_model = (
            result is not None
            and result.success is not None
            and all(np.isfinite(v) for v in result.parameters.values())
        )
        model = model_for(result, cfg) if have_model else None
        if len(d):
            tgrid = np.linspace(d.time[0] - 10.0, d.time[-1] + 10.0, 200)
        for k, b in enumerate(sorted(set(d.band))):
            mk = d.band == b
            col = _band_color(b, k)
            ax.errorbar(d.time[mk], d.flux[mk] * scale[mk], d.fluxerr[mk] * scale[mk],
                        fmt="o", ms=3, color=col, label=b)
            if model is not None:
                try:
                    zs = d.zpsys[mk][0]
                    ax.plot(tgrid, model.bandflux(b, tgrid, zp=25.0, zpsys=zs), "-", color=col, lw=1)
                except Exception:
                    pass
        ax.set_xlabel("time [MJD]")
        ax.set_ylabel("flux (zp = 25)")
        if result is not None:
            p = result.parameters
            if have_model:
                title = (f"{result.model}  z={p['z']:.3f} t0={p['t0']:.1f} x1={p['x1']:.2f} "
                         f"c={p['c']:.2f}" + ("" if result.success else " (failed)"))
            else:
                title = f"{result.model}: fit failed"
            ax.set_title(title, fontsize=9)
        if len(d):
            ax.legend(fontsize=8, loc="best")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()
    finally:
        fig.clear()
        del fig
