"""Science library of the value-added stage: survey-agnostic filters and SALT2 fits.

* :mod:`pgbctl.science.config` -- typed thresholds/settings (YAML-loadable, per-survey data)
* :mod:`pgbctl.science.filters` -- ``is_pure``, ``is_extragalactic_transient``
* :mod:`pgbctl.science.salt2` -- quality gate, ``fit``, ``fit_many``, ``plot_png``
* :mod:`pgbctl.science.sncosmo_data` -- offline model/bandpass loading
* :mod:`pgbctl.science.simulate` -- synthetic SALT2 truth set

Heavy imports (sncosmo, iminuit, matplotlib) happen inside the functions that need them.
"""

from pgbctl.science.config import FilterConfig, Salt2Config, ScienceConfig, load_config
from pgbctl.science.filters import FilterResult, is_extragalactic_transient, is_pure

__all__ = [
    "FilterConfig",
    "Salt2Config",
    "ScienceConfig",
    "load_config",
    "FilterResult",
    "is_pure",
    "is_extragalactic_transient",
]
