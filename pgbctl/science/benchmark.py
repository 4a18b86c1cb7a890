"""Speed of the SALT2 fit: ours (:func:`pgbctl.science.salt2.fit`) vs a plain ``sncosmo.fit_lc``
loop (:func:`pgbctl.science.salt2.plain_fit`) on the same synthetic light curves.

    from pgbctl.science.benchmark import fit_rates
    fit_rates(20)   # {'fits_per_s_ours': ..., 'fits_per_s_plain': ..., 'speedup': ..., ...}

Both run in the same process on the same :func:`pgbctl.science.simulate.simulate` set, warm
(model loaded, one untimed fit each first), interleaved light curve by light curve so that a
machine's load affects both alike. Used by ``bench/value_added.py``.
"""

from __future__ import annotations

import math
import statistics
import time

__all__ = ["fit_rates"]


def fit_rates(n: int = 20, seed: int = 0, *, plain: bool = True, cfg=None) -> dict:
    """Fits per second of ours and of plain ``sncosmo.fit_lc`` over ``n`` simulated SNe Ia.

    Returns ``{n, fits_per_s_ours, fits_per_s_plain, speedup, success_ours, success_plain,
    median_dz_sigma}`` (``median_dz_sigma``: median |z_ours - z_plain| / z_err_plain over the
    fits both got; the plain entries are None when ``plain`` is False).
    """
    from pgbctl.science import salt2, simulate
    from pgbctl.science.config import Salt2Config

    c = cfg or Salt2Config()
    sims = simulate.simulate(n, seed=seed)
    tables = [s.table for s in sims]
    salt2.load_model(c)
    salt2.fit(tables[0], c)  # warm: caches, band grids
    if plain:
        salt2.plain_fit(tables[0], c)
    t_ours = t_plain = 0.0
    ours, plains = [], []
    for t in tables:
        t0 = time.perf_counter()
        ours.append(salt2.fit(t, c))
        t_ours += time.perf_counter() - t0
        if plain:
            t0 = time.perf_counter()
            plains.append(salt2.plain_fit(t, c))
            t_plain += time.perf_counter() - t0
    out = {
        "n": n,
        "fits_per_s_ours": n / t_ours,
        "success_ours": sum(r.success for r in ours),
        "fits_per_s_plain": None,
        "speedup": None,
        "success_plain": None,
        "median_dz_sigma": None,
    }
    if plain:
        dz = [abs(a.z - b.z) / b.z_err for a, b in zip(ours, plains)
              if a.success and b.success and b.z_err and math.isfinite(b.z_err) and b.z_err > 0]
        out.update(
            fits_per_s_plain=n / t_plain,
            speedup=t_plain / t_ours,
            success_plain=sum(r.success for r in plains),
            median_dz_sigma=statistics.median(dz) if dz else None,
        )
    return out
