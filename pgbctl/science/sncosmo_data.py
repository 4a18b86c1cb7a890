"""Offline loading of the SALT2 model and the bandpasses, from ``SNCOSMO_DATA_DIR``.

sncosmo downloads model files on first use. A broker worker has no business doing that per
alert (and has no network in tests), so everything is read from a local data directory laid
out like sncosmo's own mirror::

    $SNCOSMO_DATA_DIR/models/salt2/salt2-4/salt2_template_0.dat ...   (8 files)
    $SNCOSMO_DATA_DIR/bandpasses/ztf/P48_g.dat ...

:func:`load_source` checks the files first and raises :class:`ModelDataError` with ONE clear
message when something is missing -- call it (or :func:`pgbctl.science.salt2.load_model`) once
when a worker starts. The loaded source is cached per process and the failure is cached too,
so a misconfigured worker does not re-scan the disk per alert.

The SALT2 version is always named explicitly (plain ``'salt2'`` in sncosmo means the newest
variant, which is not the one we ship). Bandpasses are taken from sncosmo's registry when its
data root is the directory we use; otherwise they are read from the files listed in
:data:`BANDPASS_FILES` and registered under their sncosmo names, with the same reader options
sncosmo's own loader uses, so both routes give identical bandpasses.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

__all__ = [
    "ModelDataError",
    "SALT2_MODEL_DIRS",
    "SALT2_FILES",
    "BANDPASS_FILES",
    "data_dir",
    "missing_files",
    "load_source",
    "ensure_bandpasses",
    "reset_cache",
]


class ModelDataError(RuntimeError):
    """The SALT2 model or a bandpass cannot be loaded from the local data directory."""


# (name, version) -> directory relative to the data root (sncosmo's mirror layout).
SALT2_MODEL_DIRS: dict[tuple[str, str], str] = {
    ("salt2", "2.4"): "models/salt2/salt2-4",
}

# The 8 files SALT2Source reads.
SALT2_FILES: tuple[str, ...] = (
    "salt2_template_0.dat",
    "salt2_template_1.dat",
    "salt2_color_correction.dat",
    "salt2_color_dispersion.dat",
    "salt2_lc_dispersion_scaling.dat",
    "salt2_lc_relative_variance_0.dat",
    "salt2_lc_relative_variance_1.dat",
    "salt2_lc_relative_covariance_01.dat",
)

# sncosmo band name -> file relative to the data root (same paths as sncosmo's registry).
BANDPASS_FILES: dict[str, str] = {
    "ztfg": "bandpasses/ztf/P48_g.dat",
    "ztfr": "bandpasses/ztf/P48_R.dat",
    "ztfi": "bandpasses/ztf/P48_I.dat",
    **{f"lsst{b}": f"bandpasses/lsst/total_{b}.dat" for b in "ugrizy"},
}

_LOCK = threading.Lock()
_SOURCES: dict[tuple[str, str, str], object] = {}
_FAILURES: dict[tuple[str, str, str], ModelDataError] = {}
_BANDS_DONE: set[tuple[str, str]] = set()


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data root: ``path`` if given, else ``$SNCOSMO_DATA_DIR``, else sncosmo's configured
    ``data_dir``. Raises :class:`ModelDataError` if none is set."""
    if path is None:
        path = os.environ.get("SNCOSMO_DATA_DIR")
    if not path:
        try:
            import sncosmo

            path = sncosmo.conf.data_dir
        except Exception:  # pragma: no cover - sncosmo import problems surface elsewhere
            path = None
    if not path:
        raise ModelDataError(
            "no sncosmo data directory: set SNCOSMO_DATA_DIR to a directory holding "
            "models/salt2/salt2-4/ (the SALT2 v2.4 files) and bandpasses/ (sncosmo cannot "
            "download them here)"
        )
    return Path(path)


def missing_files(root: Path, name: str = "salt2", version: str = "2.4") -> list[str]:
    """Relative paths of the model files that are missing under ``root`` ([] = complete)."""
    rel = SALT2_MODEL_DIRS.get((name, version))
    if rel is None:
        return [f"<no known layout for model {name!r} version {version!r}>"]
    return [f"{rel}/{f}" for f in SALT2_FILES if not (root / rel / f).is_file()]


def _sncosmo_root() -> Path | None:
    """The data root sncosmo's registry will use, WITHOUT triggering its side effects."""
    import sncosmo.builtins as sb

    checked = getattr(sb.DATADIR, "_checked_rootdir", None)
    if checked:
        return Path(checked)
    env = os.environ.get("SNCOSMO_DATA_DIR")
    if env:
        return Path(env)
    import sncosmo

    return Path(sncosmo.conf.data_dir) if sncosmo.conf.data_dir else None


def _same_dir(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def load_source(name: str = "salt2", version: str = "2.4", path=None):
    """The SALT2 source (``sncosmo.SALT2Source``), loaded once per process.

    Raises :class:`ModelDataError` (with the directory and the missing files named) if the
    model cannot be loaded; the error is remembered, later calls re-raise it immediately.
    """
    root = data_dir(path)
    key = (str(root), name, str(version))
    with _LOCK:
        if key in _SOURCES:
            return _SOURCES[key]
        if key in _FAILURES:
            raise _FAILURES[key]
        try:
            src = _load_source_uncached(root, name, str(version))
        except ModelDataError as e:
            _FAILURES[key] = e
            raise
        _SOURCES[key] = src
        return src


def _load_source_uncached(root: Path, name: str, version: str):
    missing = missing_files(root, name, version)
    if missing:
        raise ModelDataError(
            f"SALT2 model {name} v{version} is not available offline under {root}: missing "
            f"{', '.join(missing)}. Point SNCOSMO_DATA_DIR at a directory with sncosmo's layout "
            f"({SALT2_MODEL_DIRS.get((name, version), '?')}/...)."
        )
    import sncosmo

    try:
        if _same_dir(_sncosmo_root(), root):
            # The registry resolves to our directory and the files exist: no download.
            src = sncosmo.get_source(name, version=version)
        else:
            src = sncosmo.SALT2Source(
                modeldir=str(root / SALT2_MODEL_DIRS[(name, version)]), name=name, version=version
            )
    except Exception as e:  # corrupt files etc.
        raise ModelDataError(f"cannot load SALT2 {name} v{version} from {root}: {e}") from e
    if str(getattr(src, "version", "")) != version:
        raise ModelDataError(f"loaded {name} version {src.version!r}, expected {version!r}")
    return src


def ensure_bandpasses(names, path=None) -> None:
    """Make every band in ``names`` resolvable with ``sncosmo.get_bandpass`` offline.

    Bands listed in :data:`BANDPASS_FILES` are read from the data root (registered under their
    sncosmo name if sncosmo's own registry would look elsewhere). Other names must already be
    known to sncosmo without a download (e.g. its built-in Bessell bands).
    Raises :class:`ModelDataError` naming the band and the file.
    """
    import sncosmo

    root = data_dir(path)
    for name in sorted({str(n) for n in names}):
        key = (str(root), name)
        if key in _BANDS_DONE:
            continue
        with _LOCK:
            if key in _BANDS_DONE:
                continue
            rel = BANDPASS_FILES.get(name)
            if rel is None:
                try:
                    sncosmo.get_bandpass(name)
                except Exception as e:
                    raise ModelDataError(
                        f"unknown band {name!r}: not in pgbctl's offline bandpass list and "
                        f"not loadable by sncosmo ({e})"
                    ) from e
            else:
                f = root / rel
                if not f.is_file():
                    raise ModelDataError(f"bandpass {name!r} missing: {f} does not exist")
                if _same_dir(_sncosmo_root(), root):
                    sncosmo.get_bandpass(name)
                else:
                    import astropy.units as u
                    from sncosmo.constants import BANDPASS_TRIM_LEVEL

                    bp = sncosmo.read_bandpass(
                        str(f), wave_unit=u.AA, trim_level=BANDPASS_TRIM_LEVEL, name=name
                    )
                    sncosmo.register(bp, name, force=True)
            _BANDS_DONE.add(key)


def reset_cache() -> None:
    """Forget loaded sources, remembered failures and registered bands (tests only)."""
    with _LOCK:
        _SOURCES.clear()
        _FAILURES.clear()
        _BANDS_DONE.clear()
