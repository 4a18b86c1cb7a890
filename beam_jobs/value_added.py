r"""value-added: filters and SALT2 fits on the alert stream.

Pipeline (``run`` alone does I/O; everything between is DoFns and one composite)::

    ReadFromPubSub(subscription <survey>-alerts-value-added[-<testid>], with_attributes=True)
      | ValueAdded(inst, cfg)                                # composite, no I/O
      |   Decode      DecodeAlert: bytes -> alert dict              (bad packet -> dead_letter)
      |   Prepare     PrepareAlert: strip cutouts, message attributes
      |   [Dedup]     optional: drop a 2nd alert with the same source id (streaming only)
      |   Purity      FilterAlerts("purity")  --passed--> ToMessage -> alerts_pure
      |   Exgal       FilterAlerts("exgal")   --passed--> ToMessage -> exgalac_trans
      |                                        \--> FitSalt2: quality gate (max S/N, #detections)
      |                                              + SALT2 fit (never raises per alert)
      |                                              -> Salt2Outputs: salt2 row, salt2 message,
      |                                                 light-curve PNG
      |   (every filter/gate rejection -> "rejected", with its reasons; Beam counters too)
      +-> alerts_pure, exgalac_trans, salt2   -> WriteToPubSub (JSON, attributes)
      +-> salt2_rows                          -> WriteToBigQuery(salt2) --failed rows--+
      +-> figures                             -> UploadFigures (sncosmo bucket)        |
      +-> dead_letter ---------------------------------------------------------- Flatten
                                                           -> WriteDeadLetters (bucket + topic)

Both filters see every decoded alert (a packet can be exgal but not pure). Messages are the
alert as JSON without its cutouts (NaN/inf -> null, bytes -> base64), attributes
``objectId``, ``candid``, ``ra``, ``dec``, ``schemavsn`` (survey fields through the schema
map; an absent value is left out). The ``salt2`` message is ``{"alert": ..., "salt2Fit":
<the salt2 row>}``.

SALT2 fits run on alerts passing the extragalactic-transient filter AND the quality gate
(``Salt2Config.min_snr`` / ``min_detections``). Every fit attempted gets a ``salt2`` row
(``success`` tells whether it converged; NaN -> null); a successful fit also gets a message on
``salt2`` and a PNG (data + model) at ``salt2/plot_lc/<objectId>.<candid>.png`` in the
``sncosmo`` bucket (its ``gs://`` URI in the row's ``plot_uri``). A failed fit is counted
(``fit_failed``) and logged with its objectId; it never stops the job.

The SALT2 model files are read offline (``pgbctl.science.sncosmo_data``) from
``--sncosmo-data``: a directory (local default ``$SNCOSMO_DATA_DIR``, else
``<shared data>/sncosmo``) or ``gs://bucket/prefix`` (gcp default
``gs://<sncosmo bucket>/sncosmo_data``; workers download the files once at setup; the launcher
uploads them there from its local directory when they are missing). Missing model files stop
the job at START with one message (:class:`~pgbctl.science.sncosmo_data.ModelDataError`) --
in :func:`run` before anything is submitted, and in the DoFns' ``setup``.

Locally, ``python -m pgbctl.localrun_value_added`` drives the same DoFns in micro-batches
(fast); :func:`run` with ``--backend local`` runs this pipeline on the bundle-based
DirectRunner (slow, exact graph).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from beam_jobs.common import (
    ClientsDoFn,
    DEAD_LETTER,
    DecodeAlert,
    Decoded,
    EmulatorBigQueryClient,
    WriteDeadLetters,
    compile_schema,
    dead_letter,
    failed_row_dead_letter,
    pipeline_options,
    validate_row,
)
from pgbctl import codec, naming
from pgbctl.science.salt2 import Salt2Plotter  # noqa: F401 - the figure maker the job uses (re-exported)

log = logging.getLogger(__name__)

JOB = "value-added"
STAGE = "value-added"
SUBSCRIPTION = "alerts-value-added"  # naming stub of the input subscription
TOPIC_PURE = "alerts_pure"
TOPIC_EXGAL = "exgalac_trans"
TOPIC_SALT2 = "salt2"
SALT2_TABLE = "salt2"
FIGURE_BUCKET = "sncosmo"  # naming stub of the bucket holding the PNGs
FIGURE_PREFIX = "salt2/plot_lc"
MODEL_DATA_PREFIX = "sncosmo_data"  # gcp: gs://<sncosmo bucket>/sncosmo_data/<sncosmo layout>
ATTRIBUTES = ("objectId", "candid", "ra", "dec", "schemavsn")
FILTERS = ("purity", "exgal")
REJECTED = "rejected"
#: outputs of :class:`ValueAdded` (besides ``dead_letter`` and ``rejected``)
OUTPUTS = (TOPIC_PURE, TOPIC_EXGAL, TOPIC_SALT2, "salt2_rows", "figures")
INSERT_BATCH_SIZE = 500

_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


# =============================================================================================
# elements
# =============================================================================================


class Alert(NamedTuple):
    """A decoded alert on its way through the job: cutouts stripped, ids and the outgoing
    message attributes resolved once. ``data`` (the raw packet) is kept so a later stage can
    still dead-letter it."""

    alert: dict
    object_id: Any
    source_id: Any
    attributes: dict
    message_id: str
    data: bytes


class Rejection(NamedTuple):
    """One alert refused by a filter (``purity``, ``exgal``) or the fit's ``quality`` gate."""

    filter: str
    reasons: tuple
    object_id: Any
    source_id: Any


class Fitted(NamedTuple):
    """The fit of one alert: the light curve it used (dict of arrays) and the result."""

    alert: Alert
    lc: dict
    result: Any  # pgbctl.science.salt2.Salt2Result


# =============================================================================================
# pure helpers
# =============================================================================================


def figure_name(object_id: Any, source_id: Any) -> str:
    """Object name of an alert's light-curve PNG: ``salt2/plot_lc/<objectId>.<candid>.png``."""
    return f"{FIGURE_PREFIX}/{_SAFE.sub('_', str(object_id))}.{_SAFE.sub('_', str(source_id))}.png"


def _attr(v: Any) -> str | None:
    if v is None or isinstance(v, (bytes, bytearray)):
        return None
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else None
    return str(v)


def message_attributes(alert: dict, smap) -> dict[str, str]:
    """``objectId``, ``candid`` (the source id), ``ra``, ``dec``, ``schemavsn`` as strings;
    a value the alert does not have is left out."""
    src = codec.source_record(alert, smap)
    vals = {
        "objectId": codec.get_path(alert, smap["objectId"]),
        "candid": src.get(smap["sourceId"]),
        "ra": src.get(smap["ra"]) if smap.get("ra") else None,
        "dec": src.get(smap["dec"]) if smap.get("dec") else None,
        "schemavsn": codec.schema_version(alert, smap),
    }
    out = {}
    for k in ATTRIBUTES:
        s = _attr(vals[k])
        if s is not None:
            out[k] = s
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(o)).decode("ascii")
    try:  # numpy scalars and arrays
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def to_json(obj: Any) -> bytes:
    """Strict JSON bytes (NaN/inf -> null, bytes -> base64, numpy -> Python)."""
    try:
        return json.dumps(obj, default=_json_default, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:  # a NaN/inf somewhere: replace, then encode
        return json.dumps(_finite(obj), default=_json_default, allow_nan=False,
                          separators=(",", ":")).encode()


def lc_dict(table) -> dict:
    """A light curve (astropy Table from ``salt2.prepare``) as a plain picklable dict."""
    import numpy as np

    return {n: np.asarray(table[n]) for n in table.colnames}


def salt2_schema(survey: str) -> list[dict]:
    """The ``salt2`` table's schema (API representation) from the templates."""
    from pgbctl.backends.bqschema import load_template

    return load_template(survey, SALT2_TABLE)


def survey_bands(survey: str) -> list[str]:
    """The sncosmo bandpass names of a survey's filters (schema map ``SNCOSMO_BANDS``)."""
    from pgbctl import schemamap

    return sorted({b for b in (schemamap.load(survey).get("SNCOSMO_BANDS") or {}).values() if b})


# =============================================================================================
# SALT2 model files (offline): a directory or gs://bucket/prefix
# =============================================================================================


def default_model_data(backend: str, inst: naming.Instance) -> str | None:
    """Where the model files are read from when ``--sncosmo-data`` is not given."""
    if backend == "gcp":
        return f"gs://{inst.bucket(FIGURE_BUCKET)}/{MODEL_DATA_PREFIX}"
    env = os.environ.get("SNCOSMO_DATA_DIR")
    if env:
        return env
    from pgbctl.paths import shared_data_dir

    shared = shared_data_dir()
    if shared is not None and (shared / "sncosmo").is_dir():
        return str(shared / "sncosmo")
    return None


def required_model_files(survey: str, cfg=None) -> list[str]:
    """Paths (relative to the data root) of the SALT2 files and of the survey's bandpasses
    that pgbctl reads offline."""
    from pgbctl.science import sncosmo_data
    from pgbctl.science.config import Salt2Config

    c = _salt2_cfg(cfg) or Salt2Config()
    rel = sncosmo_data.SALT2_MODEL_DIRS.get((c.model_name, c.model_version))
    if rel is None:
        raise sncosmo_data.ModelDataError(f"no known file layout for model {c.model_label}")
    files = [f"{rel}/{f}" for f in sncosmo_data.SALT2_FILES]
    files += [sncosmo_data.BANDPASS_FILES[b] for b in survey_bands(survey) if b in sncosmo_data.BANDPASS_FILES]
    return files


def _split_gs(uri: str) -> tuple[str, str]:
    rest = uri[len("gs://"):]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


_DOWNLOAD_LOCK = threading.Lock()
_DOWNLOADED: dict[str, str] = {}


def _download_model_data(uri: str, survey: str, cfg, storage_client=None) -> str:
    """Copy the model files under ``gs://...`` into a temporary directory (once per process)."""
    from pgbctl.science.sncosmo_data import ModelDataError

    with _DOWNLOAD_LOCK:
        if uri in _DOWNLOADED:
            return _DOWNLOADED[uri]
        if storage_client is None:
            from google.cloud import storage

            storage_client = storage.Client()
        bucket_name, prefix = _split_gs(uri)
        bucket = storage_client.bucket(bucket_name)
        root = tempfile.mkdtemp(prefix="pgbctl-sncosmo-")
        missing = []
        for rel in required_model_files(survey, cfg):
            dest = os.path.join(root, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            blob = bucket.blob(f"{prefix}/{rel}" if prefix else rel)
            try:
                blob.download_to_filename(dest)
            except Exception:  # noqa: BLE001 - reported below, with every missing file
                missing.append(rel)
        if missing:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
            raise ModelDataError(f"SALT2 model data incomplete at {uri}: missing {', '.join(missing)}")
        _DOWNLOADED[uri] = root
        return root


def use_model_data(location: str | None, survey: str, cfg=None, storage_client=None) -> None:
    """Make ``location`` this process's ``SNCOSMO_DATA_DIR`` (downloading ``gs://`` first);
    None keeps the environment as it is."""
    if not location:
        return
    if location.startswith("gs://"):
        location = _download_model_data(location, survey, cfg, storage_client)
    os.environ["SNCOSMO_DATA_DIR"] = str(location)


def load_model_once(location: str | None, survey: str, cfg=None, storage_client=None) -> list[str]:
    """Load the SALT2 model (raises :class:`ModelDataError`: the job must not start) and
    register the survey's bandpasses. Returns the bands that cannot be loaded offline (fits of
    alerts observed in them will fail, each counted; a warning is logged once)."""
    from pgbctl.science import salt2, sncosmo_data

    use_model_data(location, survey, cfg, storage_client)
    salt2.load_model(_salt2_cfg(cfg))
    bad = []
    for b in survey_bands(survey):
        try:
            sncosmo_data.ensure_bandpasses([b])
        except sncosmo_data.ModelDataError:
            bad.append(b)
    if bad:
        log.warning("%s: bandpass(es) %s not available offline: fits of alerts observed in them will fail",
                    STAGE, ", ".join(bad))
    return bad


def check_model_data(location: str | None, survey: str, cfg=None, storage_client=None) -> None:
    """Launcher-side check before a job starts: raises :class:`ModelDataError` (one message)
    when the model files are not where the workers will read them."""
    from pgbctl.science.sncosmo_data import ModelDataError

    if location and location.startswith("gs://"):
        if storage_client is None:
            from google.cloud import storage

            storage_client = storage.Client()
        bucket_name, prefix = _split_gs(location)
        have = {b.name for b in storage_client.list_blobs(bucket_name, prefix=prefix or None)}
        need = required_model_files(survey, cfg)
        missing = [r for r in need if (f"{prefix}/{r}" if prefix else r) not in have]
        if missing:
            raise ModelDataError(f"SALT2 model data not found at {location}: missing {', '.join(missing)}")
        return
    if location is None and not os.environ.get("SNCOSMO_DATA_DIR"):
        raise ModelDataError("no SALT2 model data: set SNCOSMO_DATA_DIR (or --sncosmo-data) to a directory "
                             "with sncosmo's layout (models/salt2/salt2-4/...)")
    load_model_once(location, survey, cfg)


def stage_model_data(local_dir: str, uri: str, survey: str, cfg=None, storage_client=None) -> list[str]:
    """Upload the model files the workers need from ``local_dir`` to ``gs://...`` (those not
    there yet). Returns the uploaded relative paths."""
    from pathlib import Path

    from pgbctl.science.sncosmo_data import ModelDataError

    if storage_client is None:
        from google.cloud import storage

        storage_client = storage.Client()
    bucket_name, prefix = _split_gs(uri)
    bucket = storage_client.bucket(bucket_name)
    have = {b.name for b in storage_client.list_blobs(bucket_name, prefix=prefix or None)}
    done = []
    for rel in required_model_files(survey, cfg):
        name = f"{prefix}/{rel}" if prefix else rel
        if name in have:
            continue
        src = Path(local_dir) / rel
        if not src.is_file():
            raise ModelDataError(f"cannot stage SALT2 model data: {src} does not exist")
        bucket.blob(name).upload_from_filename(str(src))
        done.append(rel)
    return done


def _salt2_cfg(cfg):
    from pgbctl.science.config import ScienceConfig

    return cfg.salt2 if isinstance(cfg, ScienceConfig) else cfg


def _filter_cfg(cfg):
    from pgbctl.science.config import ScienceConfig

    return cfg.filters if isinstance(cfg, ScienceConfig) else cfg


# =============================================================================================
# DoFns
# =============================================================================================


class PrepareAlert(beam.DoFn):
    """:class:`~beam_jobs.common.Decoded` -> :class:`Alert` (cutouts stripped, attributes)."""

    def __init__(self, survey: str, stage: str = STAGE):
        self.survey = survey
        self.stage = stage
        self.bad = Metrics.counter(stage, "unpreparable")

    def setup(self):
        from pgbctl import schemamap

        self.smap = schemamap.load(self.survey)

    def process(self, d: Decoded):
        try:
            stripped = codec.strip_cutouts(d.alert, self.smap)
            object_id, source_id = codec.alert_ids(d.alert, self.smap)
            attrs = message_attributes(d.alert, self.smap)
        except Exception as e:  # noqa: BLE001 - odd content is dead-lettered, never raised
            self.bad.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                self.stage, f"cannot prepare alert: {type(e).__name__}: {e}", message_id=d.message_id,
                attributes=d.attributes, data=d.data))
            return
        yield Alert(stripped, object_id, source_id, attrs, d.message_id, d.data)


class FilterAlerts(beam.DoFn):
    """Pass the alerts that pass filter ``which`` (``purity`` or ``exgal``); every rejection
    goes to the ``rejected`` output as a :class:`Rejection` and increments the Beam counters
    ``<which>_rejected`` and ``<which>_rejected.<reason>`` (one per reason)."""

    def __init__(self, survey: str, which: str, cfg=None, stage: str = STAGE):
        if which not in FILTERS:
            raise ValueError(f"unknown filter {which!r}; choose from {FILTERS}")
        self.survey = survey
        self.which = which
        self.cfg = cfg
        self.stage = stage
        self.passed = Metrics.counter(stage, f"{which}_passed")
        self.rejected = Metrics.counter(stage, f"{which}_rejected")
        self._reason_counters: dict[str, Any] = {}

    def setup(self):
        from pgbctl import schemamap
        from pgbctl.science import filters
        from pgbctl.science.config import ScienceConfig

        self.smap = schemamap.load(self.survey)
        cfg = self.cfg if self.cfg is not None else ScienceConfig.default().for_survey(self.survey)
        self._cfg = _filter_cfg(cfg)
        self._fn = filters.is_pure if self.which == "purity" else filters.is_extragalactic_transient

    def _reason(self, r: str):
        c = self._reason_counters.get(r)
        if c is None:
            c = self._reason_counters[r] = Metrics.counter(self.stage, f"{self.which}_rejected.{r}")
        return c

    def process(self, a: Alert):
        res = self._fn(a.alert, self.smap, self._cfg)
        if res.passed:
            self.passed.inc()
            yield a
            return
        self.rejected.inc()
        for r in res.reasons:
            self._reason(r).inc()
        yield pvalue.TaggedOutput(REJECTED, Rejection(self.which, tuple(res.reasons), a.object_id, a.source_id))


class ToMessage(beam.DoFn):
    """:class:`Alert` -> ``PubsubMessage`` (the alert as JSON, the alert's attributes)."""

    def __init__(self, topic_stub: str, stage: str = STAGE):
        self.topic_stub = topic_stub
        self.stage = stage
        self.count = Metrics.counter(stage, f"published_{topic_stub}")

    def process(self, a: Alert):
        from apache_beam.io.gcp.pubsub import PubsubMessage

        try:
            data = to_json(a.alert)
        except Exception as e:  # noqa: BLE001
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                self.stage, f"{self.topic_stub}: cannot encode the alert as JSON: {type(e).__name__}: {e}",
                message_id=a.message_id, attributes=a.attributes, data=a.data))
            return
        self.count.inc()
        yield PubsubMessage(data, dict(a.attributes))


class FitSalt2(beam.DoFn):
    """:class:`Alert` (already through the extragalactic-transient filter) -> quality gate ->
    SALT2 fit -> :class:`Fitted`. The gate's rejections go to ``rejected`` (filter
    ``quality``). A failed fit is counted (``fit_failed``), logged with the objectId, and still
    passed on (it gets a ``salt2`` row with ``success`` false). ``setup`` loads the model and
    raises :class:`~pgbctl.science.sncosmo_data.ModelDataError` if it cannot."""

    def __init__(self, survey: str, cfg=None, model_data: str | None = None, stage: str = STAGE):
        self.survey = survey
        self.cfg = cfg
        self.model_data = model_data
        self.stage = stage
        self.fits = Metrics.counter(stage, "fits")
        self.ok = Metrics.counter(stage, "fit_succeeded")
        self.failed = Metrics.counter(stage, "fit_failed")
        self.gated = Metrics.counter(stage, "quality_rejected")
        self.fit_ms = Metrics.distribution(stage, "fit_ms")
        self._reason_counters: dict[str, Any] = {}

    def setup(self):
        from pgbctl import schemamap
        from pgbctl.science.config import ScienceConfig

        self.smap = schemamap.load(self.survey)
        cfg = self.cfg if self.cfg is not None else ScienceConfig.default().for_survey(self.survey)
        self._cfg = _salt2_cfg(cfg)
        load_model_once(self.model_data, self.survey, self._cfg)

    def process(self, a: Alert):
        from pgbctl.science import salt2

        try:
            table = salt2.prepare(a.alert, self.smap)
        except Exception as e:  # noqa: BLE001
            table, why = None, f"{type(e).__name__}: {e}"
        gate = salt2.quality_gate(table, self._cfg) if table is not None else None
        if gate is None or not gate.passed:
            reasons = tuple(gate.reasons) if gate is not None else ("bad_lightcurve",)
            self.gated.inc()
            for r in reasons:
                c = self._reason_counters.get(r)
                if c is None:
                    c = self._reason_counters[r] = Metrics.counter(self.stage, f"quality_rejected.{r}")
                c.inc()
            if gate is None:
                log.warning("%s: %s: light curve unreadable: %s", self.stage, a.object_id, why)
            yield pvalue.TaggedOutput(REJECTED, Rejection("quality", reasons, a.object_id, a.source_id))
            return
        self.fits.inc()
        res = salt2.fit(table, self._cfg, object_id=a.object_id, candid=a.source_id)
        self.fit_ms.update(int(res.elapsed_s * 1000))
        if res.success:
            self.ok.inc()
        else:
            self.failed.inc()
            log.warning("%s: SALT2 fit failed for %s (candid %s): %s", self.stage, a.object_id, a.source_id,
                        res.message)
        yield Fitted(a, lc_dict(table), res)


class Salt2Outputs(beam.DoFn):
    """:class:`Fitted` -> the ``salt2`` row (``salt2_rows``, validated against the table
    schema; every fit), and for a successful fit the PNG (``figures``: ``(object name, png
    bytes)``) and the ``salt2`` message (main output, a ``PubsubMessage``). A row the table
    would refuse sends the packet to ``dead_letter``; a plot that fails is counted and
    logged (the row then has no ``plot_uri``)."""

    def __init__(self, survey: str, bucket: str, schema: list[dict], cfg=None, model_data: str | None = None,
                 stage: str = STAGE, plots: bool = True):
        self.survey = survey
        self.bucket = bucket
        self.schema = schema
        self.cfg = cfg
        self.model_data = model_data
        self.stage = stage
        self.plots = plots
        self.rows = Metrics.counter(stage, "rows_salt2")
        self.figures = Metrics.counter(stage, "figures")
        self.plot_failed = Metrics.counter(stage, "plot_failed")
        self.invalid = Metrics.counter(stage, "invalid_rows")

    def setup(self):
        from pgbctl.science.config import ScienceConfig

        cfg = self.cfg if self.cfg is not None else ScienceConfig.default().for_survey(self.survey)
        self._cfg = _salt2_cfg(cfg)
        self._schema = compile_schema(self.schema)
        load_model_once(self.model_data, self.survey, self._cfg)
        self._plotter = Salt2Plotter()

    def process(self, f: Fitted):
        from apache_beam.io.gcp.pubsub import PubsubMessage

        from pgbctl.rows import RowError

        a, res = f.alert, f.result
        png = None
        name = figure_name(a.object_id, a.source_id)
        if res.success and self.plots:
            try:
                png = self._plotter.png(f.lc, res, cfg=self._cfg)
            except Exception as e:  # noqa: BLE001 - a figure is not worth losing the fit
                self.plot_failed.inc()
                log.warning("%s: plot failed for %s (candid %s): %s: %s", self.stage, a.object_id, a.source_id,
                            type(e).__name__, e)
        full = res.to_row(include_message=True)
        full["plot_uri"] = f"gs://{self.bucket}/{name}" if png is not None else None
        try:
            row, _unknown = validate_row(full, self._schema, SALT2_TABLE)
        except RowError as e:
            self.invalid.inc()
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                self.stage, str(e), message_id=a.message_id, attributes=a.attributes, data=a.data))
            return
        self.rows.inc()
        yield pvalue.TaggedOutput("salt2_rows", row)
        if not res.success:
            return
        if png is not None:
            self.figures.inc()
            yield pvalue.TaggedOutput("figures", (name, png))
        try:
            data = to_json({"alert": a.alert, "salt2Fit": _finite(full)})
        except Exception as e:  # noqa: BLE001
            yield pvalue.TaggedOutput(DEAD_LETTER, dead_letter(
                self.stage, f"salt2: cannot encode the message as JSON: {type(e).__name__}: {e}",
                message_id=a.message_id, attributes=a.attributes, data=a.data))
            return
        yield PubsubMessage(data, dict(a.attributes))

    def teardown(self):
        plotter = getattr(self, "_plotter", None)
        if plotter is not None:
            plotter.close()


class UploadFigures(ClientsDoFn):
    """``(object name, png bytes)`` -> the ``sncosmo`` bucket (overwrites: a redelivered
    alert re-writes the same object). Storage errors raise (the bundle is retried)."""

    def __init__(self, inst: naming.Instance, backend: str, endpoints: Any = None, clients: Any = None,
                 retry_timeout: float | None = None):
        super().__init__(inst, backend, endpoints, clients)
        self.retry_timeout = retry_timeout  # None: google-cloud-storage's default (120 s)
        self.count = Metrics.counter(STAGE, "figures_uploaded")

    def setup(self):
        super().setup()
        self._bucket = self._clients.storage.bucket(self.inst.bucket(FIGURE_BUCKET))

    def upload(self, name: str, png: bytes) -> None:
        kw = {}
        if self.retry_timeout is not None:
            from google.cloud.storage.retry import DEFAULT_RETRY

            kw["retry"] = DEFAULT_RETRY.with_timeout(self.retry_timeout)
        self._bucket.blob(name).upload_from_string(png, content_type="image/png", **kw)
        self.count.inc()

    def process(self, fig):
        name, png = fig
        self.upload(name, png)
        yield name


def _source_id_kv(a: Alert):
    return int(a.source_id), a


def _value(kv):
    return kv[1]


# =============================================================================================
# composite transform
# =============================================================================================


class ValueAdded(beam.PTransform):
    """Pub/Sub messages -> ``{alerts_pure, exgalac_trans, salt2: PubsubMessages; salt2_rows:
    dicts; figures: (name, png); rejected: Rejection; dead_letter: dead letters}``. No I/O.

    ``cfg``: a :class:`~pgbctl.science.config.ScienceConfig` (None: the shipped defaults for
    the survey). ``dedup_minutes``: > 0 drops a second alert with the same source id seen
    within that many minutes (stateful; for streaming runs).
    """

    def __init__(self, inst: naming.Instance, cfg=None, *, model_data: str | None = None,
                 schema: list[dict] | None = None, dedup_minutes: float = 0.0, stage: str = STAGE,
                 plots: bool = True):
        super().__init__()
        self.inst = inst
        self.cfg = cfg
        self.model_data = model_data
        self.schema = schema or salt2_schema(inst.survey)
        self.dedup_minutes = dedup_minutes
        self.stage = stage
        self.plots = plots

    def expand(self, messages):
        survey, stage, cfg = self.inst.survey, self.stage, self.cfg
        decoded = messages | "Decode" >> beam.ParDo(DecodeAlert(survey, stage)).with_outputs(
            DEAD_LETTER, main="alerts")
        prepared = decoded.alerts | "Prepare" >> beam.ParDo(PrepareAlert(survey, stage)).with_outputs(
            DEAD_LETTER, main="alerts")
        alerts = prepared.alerts
        if self.dedup_minutes and self.dedup_minutes > 0:
            from typing import Tuple

            from beam_jobs.bq_sink import DedupBySourceId

            keyed = alerts | "KeyBySourceId" >> beam.Map(_source_id_kv).with_output_types(Tuple[int, Any])
            alerts = (keyed | "Dedup" >> DedupBySourceId(self.dedup_minutes)
                      | "DropKeys" >> beam.Map(_value))
        pure = alerts | "Purity" >> beam.ParDo(FilterAlerts(survey, "purity", cfg, stage)).with_outputs(
            REJECTED, main="passed")
        exgal = alerts | "Exgal" >> beam.ParDo(FilterAlerts(survey, "exgal", cfg, stage)).with_outputs(
            REJECTED, main="passed")
        pure_msgs = pure.passed | "PureMessages" >> beam.ParDo(ToMessage(TOPIC_PURE, stage)).with_outputs(
            DEAD_LETTER, main="messages")
        exgal_msgs = exgal.passed | "ExgalMessages" >> beam.ParDo(ToMessage(TOPIC_EXGAL, stage)).with_outputs(
            DEAD_LETTER, main="messages")
        fitted = exgal.passed | "FitSalt2" >> beam.ParDo(FitSalt2(survey, cfg, self.model_data, stage)).with_outputs(
            REJECTED, main="fitted")
        outs = fitted.fitted | "Salt2Outputs" >> beam.ParDo(Salt2Outputs(
            survey, self.inst.bucket(FIGURE_BUCKET), self.schema, cfg, self.model_data, stage, self.plots,
        )).with_outputs("salt2_rows", "figures", DEAD_LETTER, main="messages")
        rejected = (pure[REJECTED], exgal[REJECTED], fitted[REJECTED]) | "FlattenRejected" >> beam.Flatten()
        dead = (decoded[DEAD_LETTER], prepared[DEAD_LETTER], pure_msgs[DEAD_LETTER], exgal_msgs[DEAD_LETTER],
                outs[DEAD_LETTER]) | "FlattenDeadLetters" >> beam.Flatten()
        return {
            TOPIC_PURE: pure_msgs.messages,
            TOPIC_EXGAL: exgal_msgs.messages,
            TOPIC_SALT2: outs.messages,
            "salt2_rows": outs.salt2_rows,
            "figures": outs.figures,
            REJECTED: rejected,
            DEAD_LETTER: dead,
        }


# =============================================================================================
# run: the only place with I/O
# =============================================================================================


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m beam_jobs.value_added", description=__doc__.splitlines()[0])
    p.add_argument("--survey", required=True)
    p.add_argument("--testid", default=None, help="omit for production")
    p.add_argument("--project", required=True, dest="gcp_project")
    p.add_argument("--backend", choices=("gcp", "local"), default="gcp")
    p.add_argument("--region", default="us-central1")
    p.add_argument("--max-num-workers", type=int, default=2)
    p.add_argument("--machine-type", default=None)
    p.add_argument("--dedup-minutes", type=float, default=10.0,
                   help="drop a 2nd alert with the same source id within this window (0: off)")
    p.add_argument("--science-config", default=None, metavar="YAML",
                   help="filter/SALT2 settings overriding the shipped defaults (pgbctl.science.config)")
    p.add_argument("--sncosmo-data", default=None, metavar="DIR|gs://...",
                   help="SALT2 model files (default: local $SNCOSMO_DATA_DIR; gcp gs://<sncosmo bucket>/"
                        f"{MODEL_DATA_PREFIX})")
    p.add_argument("--no-plots", action="store_true", help="skip the light-curve PNGs")
    p.add_argument("--home", default=None, help="local backend state dir (default $PGBCTL_HOME)")
    return p


def load_science_config(path: str | None, survey: str):
    """The science config for ``survey``: shipped defaults, overridden by the YAML at
    ``path`` (if any)."""
    from pathlib import Path

    from pgbctl.science.config import load_config

    text = Path(path).read_text() if path else None
    return load_config(text, survey=survey)


def salt2_write_kwargs(inst: naming.Instance, schema: list[dict], backend: str, endpoints: Any = None) -> dict:
    """Keyword arguments of ``WriteToBigQuery`` for the ``salt2`` table."""
    from apache_beam.io.gcp.bigquery_tools import RetryStrategy

    kw = dict(
        table=f"{inst.project}:{inst.dataset}.{SALT2_TABLE}",
        schema={"fields": schema},
        method=beam.io.WriteToBigQuery.Method.STREAMING_INSERTS,
        create_disposition=beam.io.BigQueryDisposition.CREATE_NEVER,
        write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
        insert_retry_strategy=RetryStrategy.RETRY_ON_TRANSIENT_ERROR,
        batch_size=INSERT_BATCH_SIZE,
    )
    if backend == "gcp":
        kw["with_auto_sharding"] = True
    else:
        kw["test_client"] = EmulatorBigQueryClient(inst.project, endpoints.bigquery_url)
    return kw


def build(p: beam.Pipeline, inst: naming.Instance, backend: str, *, cfg=None, endpoints: Any = None,
          model_data: str | None = None, dedup_minutes: float = 10.0, plots: bool = True) -> dict:
    """Add the whole job to pipeline ``p``; returns the composite's outputs."""
    schema = salt2_schema(inst.survey)
    subscription = f"projects/{inst.project}/subscriptions/{inst.subscription(SUBSCRIPTION)}"
    messages = p | "Read" >> beam.io.ReadFromPubSub(subscription=subscription, with_attributes=True)
    out = messages | "ValueAdded" >> ValueAdded(inst, cfg, model_data=model_data, schema=schema,
                                                dedup_minutes=dedup_minutes, plots=plots)
    for stub in (TOPIC_PURE, TOPIC_EXGAL, TOPIC_SALT2):
        out[stub] | f"Publish_{stub}" >> beam.io.WriteToPubSub(
            f"projects/{inst.project}/topics/{inst.topic(stub)}", with_attributes=True)
    result = out["salt2_rows"] | "Write_salt2" >> beam.io.WriteToBigQuery(
        **salt2_write_kwargs(inst, schema, backend, endpoints))
    failed = result.failed_rows_with_errors | "FailedRows_salt2" >> beam.Map(failed_row_dead_letter, STAGE, "candid")
    out["figures"] | "UploadFigures" >> beam.ParDo(UploadFigures(inst, backend, endpoints))
    ((out[DEAD_LETTER], failed) | "AllDeadLetters" >> beam.Flatten()
     | "WriteDeadLetters" >> beam.ParDo(WriteDeadLetters(inst, backend, endpoints)))
    return out


def run(argv: list[str] | None = None, *, wait: bool | None = None):
    """Check the model data, build the options and the pipeline, run it. Returns the
    PipelineResult. Raises :class:`~pgbctl.science.sncosmo_data.ModelDataError` (before
    anything is submitted) when the SALT2 model files are missing.

    ``wait``: block until the pipeline ends (default: locally yes, on Dataflow no).
    """
    args, beam_args = build_parser().parse_known_args(argv)
    inst = naming.Instance(args.survey, args.testid, args.gcp_project)
    cfg = load_science_config(args.science_config, inst.survey)
    model_data = args.sncosmo_data or default_model_data(args.backend, inst)
    endpoints = None
    if args.backend == "local":
        check_model_data(model_data, inst.survey, cfg)  # before anything else: one clear message
        from pgbctl.local import services

        endpoints = services.endpoints(args.home, project=inst.project)
        # ReadFromPubSub / WriteToPubSub on the DirectRunner build their own clients: the emulator env
        os.environ.update(endpoints.env(inst.project))
    else:
        from pgbctl.science.sncosmo_data import ModelDataError

        if not model_data.startswith("gs://"):
            raise ModelDataError(f"--sncosmo-data {model_data!r}: Dataflow workers cannot read a local directory; "
                                 "give gs://bucket/prefix (default: the instance's sncosmo bucket)")
        from google.cloud import storage

        client = storage.Client(project=inst.project)
        local = default_model_data("local", inst)
        if local:
            staged = stage_model_data(local, model_data, inst.survey, cfg, client)
            if staged:
                log.info("staged %d SALT2 model file(s) to %s", len(staged), model_data)
        check_model_data(model_data, inst.survey, cfg, client)
    options = pipeline_options(JOB, inst, args.backend, region=args.region, max_num_workers=args.max_num_workers,
                               machine_type=args.machine_type, extra=beam_args)
    p = beam.Pipeline(options=options)
    build(p, inst, args.backend, cfg=cfg, endpoints=endpoints, model_data=model_data,
          dedup_minutes=args.dedup_minutes, plots=not args.no_plots)
    result = p.run()
    if wait if wait is not None else args.backend == "local":
        try:
            result.wait_until_finish()
        except KeyboardInterrupt:
            log.info("interrupted: cancelling the pipeline")
            try:
                result.cancel()
            except Exception as e:  # noqa: BLE001
                log.warning("cancel: %s", e)
            raise
    return result


def main(argv: list[str] | None = None) -> int:
    from pgbctl.science.sncosmo_data import ModelDataError

    logging.basicConfig(level=logging.INFO)
    logging.getLogger("apache_beam.typehints").setLevel(logging.WARNING)
    try:
        run(argv)
    except ModelDataError as e:
        print(f"value-added: cannot start: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
