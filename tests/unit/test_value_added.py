"""value-added job (beam_jobs/value_added.py): the composite on TestPipeline + assert_that with
synthetic supernova-like and real ZTF alerts, the DoFns on their own, failure handling, and
the model-data check that stops the job at start."""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path

import pytest

from pgbctl.paths import REPO_ROOT, shared_data_dir

_SHARED = shared_data_dir()
if not os.environ.get("SNCOSMO_DATA_DIR") and _SHARED is not None and (_SHARED / "sncosmo").is_dir():
    os.environ["SNCOSMO_DATA_DIR"] = str(_SHARED / "sncosmo")

import sys  # noqa: E402

if str(REPO_ROOT) not in sys.path:  # beam_jobs is not an installed package
    sys.path.insert(0, str(REPO_ROOT))

import apache_beam as beam  # noqa: E402
from apache_beam.io.gcp.pubsub import PubsubMessage  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline as _TestPipeline  # noqa: E402
from apache_beam.testing.util import BeamAssertException, assert_that  # noqa: E402

from beam_jobs import value_added as va  # noqa: E402
from beam_jobs.common import DEAD_LETTER, LOCAL_RUNNER, Decoded, compile_schema, validate_row  # noqa: E402
from pgbctl import codec, naming, schemamap, synth  # noqa: E402
from pgbctl.science import filters, salt2, sncosmo_data  # noqa: E402

_DATA = os.environ.get("SNCOSMO_DATA_DIR")
needs_model = pytest.mark.skipif(
    not _DATA or sncosmo_data.missing_files(Path(_DATA)) != [],
    reason="SALT2 v2.4 model files not available (set SNCOSMO_DATA_DIR)",
)

INST = naming.Instance("ztf", "unit", "pgbctl-local")
SMAP = schemamap.load("ztf")
CUTOUTS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


# ---- inputs ------------------------------------------------------------------------------------


def _real_packets() -> list[bytes]:
    if _SHARED is None:
        return []
    alerts = sorted((_SHARED / "ztf" / "alerts").glob("*.avro"))[:8]
    series = sorted((_SHARED / "ztf" / "ZTF21abiuvdk").glob("*.avro"))[-3:]
    return [p.read_bytes() for p in alerts + series]


@pytest.fixture(scope="module")
def packets() -> list[bytes]:
    """Supernova-like synthetic alerts (SALT2 light curves), a synthetic mix (artifacts,
    asteroids, stars: rejections), real ZTF alerts when present, one duplicate, one junk."""
    pk = synth.generate(24, seed=2, kind="sn") + synth.generate(12, seed=5)
    pk += _real_packets()
    return pk + [pk[-1], b"certainly not avro"]


def _expected(pk: list[bytes]) -> dict:
    """What the job must produce, computed straight from the science library (unique alerts)."""
    from pgbctl.science.config import ScienceConfig

    cfg = ScienceConfig.default().for_survey("ztf")
    exp = collections.defaultdict(set)
    reasons = collections.Counter()
    seen = set()
    for p in pk:
        try:
            a = codec.decode(p)
        except codec.AlertDecodeError:
            exp["dead"].add(p[:8])
            continue
        cid = str(a["candid"])
        if cid in seen:
            continue
        seen.add(cid)
        exp["in"].add(cid)
        pr = filters.is_pure(a, SMAP, cfg.filters)
        ex = filters.is_extragalactic_transient(a, SMAP, cfg.filters)
        (exp["pure"] if pr.passed else exp["not_pure"]).add(cid)
        reasons.update(f"purity:{r}" for r in pr.reasons)
        reasons.update(f"exgal:{r}" for r in ex.reasons)
        if not ex.passed:
            continue
        exp["exgal"].add(cid)
        gate, res = salt2.fit_alert(a, SMAP, cfg.salt2)
        reasons.update(f"quality:{r}" for r in gate.reasons)
        if res is not None:
            exp["fitted"].add(cid)
            if res.success:
                exp["success"].add(cid)
    exp["reasons"] = reasons
    return exp


# ---- matchers (run inside the pipeline) --------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise BeamAssertException(msg)


def _candids_are(want: set, what: str):
    def match(msgs):
        got = [m.attributes["candid"] for m in msgs]
        _check(len(got) == len(set(got)), f"{what}: duplicate messages {sorted(got)}")
        _check(set(got) == want, f"{what}: got {sorted(got)}, want {sorted(want)}")
        for m in msgs:
            _check(set(m.attributes) == set(va.ATTRIBUTES), f"{what}: attributes {sorted(m.attributes)}")
            body = json.loads(m.data)
            alert = body.get("alert", body)
            _check(not any(c in alert for c in CUTOUTS), f"{what}: cutouts not stripped")
            _check(str(alert["candid"]) == m.attributes["candid"], f"{what}: candid attribute differs")
            _check(alert["objectId"] == m.attributes["objectId"], f"{what}: objectId attribute differs")
            _check(float(m.attributes["ra"]) == alert["candidate"]["ra"], f"{what}: ra attribute differs")
            _check(m.attributes["schemavsn"] == alert["schemavsn"], f"{what}: schemavsn attribute differs")
    return match


def _salt2_messages(want: set):
    base = _candids_are(want, "salt2")

    def match(msgs):
        base(msgs)
        for m in msgs:
            body = json.loads(m.data)
            _check(set(body) == {"alert", "salt2Fit"}, f"salt2 message keys {sorted(body)}")
            fit = body["salt2Fit"]
            _check(fit["success"] is True and str(fit["candid"]) == m.attributes["candid"], "salt2Fit")
            _check(fit["plot_uri"] == f"gs://{INST.bucket('sncosmo')}/"
                   f"{va.figure_name(fit['objectId'], fit['candid'])}", f"plot_uri {fit['plot_uri']}")
    return match


def _rows(want: set, success: set):
    schema = compile_schema(va.salt2_schema("ztf"))

    def match(rows):
        got = [str(r["candid"]) for r in rows]
        _check(sorted(got) == sorted(want), f"salt2 rows: got {sorted(got)}, want {sorted(want)}")
        for r in rows:
            validate_row(r, schema, "salt2")  # raises on anything BigQuery would refuse
            json.dumps(r, allow_nan=False)  # NaN -> null
            _check(r["success"] is (str(r["candid"]) in success), f"success flag of {r['candid']}")
            _check(r["model_name"] == "salt2" and r["model_version"] == "2.4", "model")
            if r["success"]:
                _check(all(math.isfinite(r[p]) for p in ("z", "t0", "x0", "x1", "c")), "parameters")
            else:
                _check("plot_uri" not in r, "no figure for a failed fit")
    return match


def _figures(want: set):
    def match(figs):
        names = sorted(n for n, _ in figs)
        _check(len(names) == len(want), f"figures: {len(names)} for {len(want)} successful fits")
        for n, png in figs:
            _check(n.startswith("salt2/plot_lc/ZTF") and n.endswith(".png"), f"figure name {n}")
            _check(n.rsplit(".", 2)[-2] in want, f"figure {n} is not of a successful fit")
            _check(png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG")
    return match


def _rejections(want: collections.Counter):
    def match(rejected):
        got = collections.Counter(f"{r.filter}:{x}" for r in rejected for x in r.reasons)
        _check(got == want, f"rejections by reason: got {dict(got)}, want {dict(want)}")
    return match


def _dead(n: int):
    def match(dls):
        _check(len(dls) == n, f"{len(dls)} dead letters, want {n}")
        for d in dls:
            _check(d["stage"] == "value-added" and "not an Avro container" in d["reason"], d["reason"])
            _check(d["data"] == b"certainly not avro", "the packet travels with its dead letter")
    return match


# ---- the composite -----------------------------------------------------------------------------


@needs_model
def test_composite_on_synthetic_and_real_alerts(packets):
    exp = _expected(packets)
    assert exp["success"] and exp["pure"] != exp["exgal"]  # the inputs exercise every branch
    msgs = [PubsubMessage(p, {"origin": "test"}, message_id=f"m{i}") for i, p in enumerate(packets)]
    p = _TestPipeline(runner=LOCAL_RUNNER)
    out = (p | beam.Create(msgs, reshuffle=False)
           | va.ValueAdded(INST, dedup_minutes=10))  # the duplicate packet is dropped
    assert_that(out["alerts_pure"], _candids_are(exp["pure"], "alerts_pure"), label="pure")
    assert_that(out["exgalac_trans"], _candids_are(exp["exgal"], "exgalac_trans"), label="exgal")
    assert_that(out["salt2"], _salt2_messages(exp["success"]), label="salt2")
    assert_that(out["salt2_rows"], _rows(exp["fitted"], exp["success"]), label="rows")
    assert_that(out["figures"], _figures(exp["success"]), label="figures")
    assert_that(out["rejected"], _rejections(exp["reasons"]), label="rejected")
    assert_that(out[DEAD_LETTER], _dead(1), label="dead")
    result = p.run()
    result.wait_until_finish()

    # rejections are countable by reason in the job's metrics too
    from apache_beam.metrics.metric import MetricsFilter

    counters = collections.Counter()
    for c in result.metrics().query(MetricsFilter())["counters"]:
        counters[c.key.metric.name] += c.committed or c.attempted or 0
    for key, n in exp["reasons"].items():
        which, reason = key.split(":", 1)
        assert counters[f"{which}_rejected.{reason}"] == n, key
    assert counters["purity_passed"] == len(exp["pure"])
    assert counters["exgal_passed"] == len(exp["exgal"])
    assert counters["fits"] == len(exp["fitted"])
    assert counters["fit_succeeded"] == len(exp["success"])
    assert counters["fit_failed"] == len(exp["fitted"] - exp["success"])
    assert counters["figures"] == len(exp["success"])


@needs_model
def test_fast_executor_processor_runs_the_same_dofns(packets):
    """pgbctl.localrun_value_added.Processor (what the fast local executor runs per message)
    gives what the composite gives."""
    from pgbctl.localrun_value_added import Processor

    exp = _expected(packets)
    proc = Processor(INST)
    results = [proc.process(p, {}, f"m{i}") for i, p in enumerate(packets[:-2])]  # unique ones
    by_topic = collections.defaultdict(set)
    for r in results:
        for topic, data, attrs in r.messages:
            by_topic[topic].add(attrs["candid"])
            assert set(attrs) == set(va.ATTRIBUTES) and json.loads(data)
    assert by_topic["alerts_pure"] == exp["pure"] and by_topic["exgalac_trans"] == exp["exgal"]
    assert by_topic["salt2"] == exp["success"]
    assert {str(r.row["candid"]) for r in results if r.row} == exp["fitted"]
    assert {str(r.source_id) for r in results if r.figure} == exp["success"]
    assert {str(r.source_id) for r in results if r.fit == "ok"} == exp["success"]
    got = collections.Counter(f"{w}:{x}" for r in results for w, reasons in r.rejections for x in reasons)
    assert got == exp["reasons"]
    bad = proc.process(b"certainly not avro", {}, "junk")
    assert bad.source_id is None and len(bad.dead) == 1 and not bad.messages


# ---- the DoFns on their own --------------------------------------------------------------------


def _drive(fn, elements):
    """Run a DoFn in-process; outputs by tag ("main" for untagged)."""
    from apache_beam import pvalue

    fn.setup()
    out = collections.defaultdict(list)
    for e in elements:
        for o in fn.process(e) or ():
            if isinstance(o, pvalue.TaggedOutput):
                out[o.tag].append(o.value)
            else:
                out["main"].append(o)
    return out


def _alert(data: bytes) -> va.Alert:
    a = codec.decode(data)
    (prepared,) = _drive(va.PrepareAlert("ztf"), [Decoded(a, "m1", {}, data)])["main"]
    return prepared


def test_prepare_strips_cutouts_and_sets_attributes():
    data = synth.generate(1, seed=9, kind="sn", cutout_bytes=2000)[0]
    a = _alert(data)
    assert not any(c in a.alert for c in CUTOUTS)
    assert a.data == data and a.message_id == "m1"
    orig = codec.decode(data)
    assert a.attributes == {
        "objectId": orig["objectId"], "candid": str(orig["candid"]),
        "ra": repr(orig["candidate"]["ra"]), "dec": repr(orig["candidate"]["dec"]),
        "schemavsn": orig["schemavsn"],
    }


@needs_model
def test_failed_fit_is_counted_and_never_raises(caplog):
    """A light curve that passes the gate but cannot be fitted: a row with success false, no
    message, no figure, a warning naming the objectId."""
    from pgbctl.science.config import ScienceConfig

    cfg = ScienceConfig.default().for_survey("ztf")
    cfg = cfg.replace(salt2=cfg.salt2.replace(min_detections=1, min_dof=0, min_snr=0.0))
    a = _alert(synth.generate(1, seed=4, kind="sn")[0])  # one detection: nothing to fit
    fitted = _drive(va.FitSalt2("ztf", cfg), [a])
    assert not fitted["rejected"] and len(fitted["main"]) == 1
    res = fitted["main"][0].result
    assert res.success is False and res.object_id == a.object_id
    assert a.object_id in caplog.text and "fit failed" in caplog.text
    out = _drive(va.Salt2Outputs("ztf", INST.bucket("sncosmo"), va.salt2_schema("ztf"), cfg), fitted["main"])
    assert not out["main"] and not out["figures"] and not out[DEAD_LETTER]
    (row,) = out["salt2_rows"]
    assert row["success"] is False and row["objectId"] == a.object_id and row["message"]
    assert row["candid"] == a.source_id and "z" not in row  # NaN -> null (left out)


@needs_model
def test_quality_gate_rejections():
    a = _alert(synth.generate(1, seed=4, kind="sn")[0])
    out = _drive(va.FitSalt2("ztf"), [a])
    assert not out["main"]
    (rej,) = out["rejected"]
    assert rej.filter == "quality" and "few_detections" in rej.reasons and rej.object_id == a.object_id


@needs_model
def test_plot_failure_keeps_the_row(monkeypatch):
    pk = [p for p in synth.generate(40, seed=1, kind="sn")]
    fitted = _drive(va.FitSalt2("ztf"), [_alert(p) for p in pk[-6:]])["main"]
    ok = [f for f in fitted if f.result.success]
    assert ok

    def boom(*a, **k):
        raise RuntimeError("no canvas")

    monkeypatch.setattr(va.Salt2Plotter, "png", boom)
    out = _drive(va.Salt2Outputs("ztf", INST.bucket("sncosmo"), va.salt2_schema("ztf")), ok[:1])
    (row,) = out["salt2_rows"]
    assert row["success"] and "plot_uri" not in row
    assert not out["figures"] and len(out["main"]) == 1


def test_filter_counts_every_reason():
    artifacts = [_alert(p) for p in synth.generate(6, seed=3, kind="artifact")]
    out = _drive(va.FilterAlerts("ztf", "purity"), artifacts)
    assert out["rejected"] and all(r.filter == "purity" and r.reasons for r in out["rejected"])
    assert len(out["main"]) + len(out["rejected"]) == len(artifacts)
    with pytest.raises(ValueError):
        va.FilterAlerts("ztf", "nope")


@needs_model
def test_plotter_reuses_one_figure_without_growth():
    import gc

    pk = synth.generate(40, seed=1, kind="sn")
    fitted = [f for f in _drive(va.FitSalt2("ztf"), [_alert(p) for p in pk[-8:]])["main"] if f.result.success]
    assert fitted
    plotter = va.Salt2Plotter()
    first = plotter.png(fitted[0].lc, fitted[0].result)
    assert first[:8] == b"\x89PNG\r\n\x1a\n"

    def live_objects(n_plots: int) -> int:
        for i in range(n_plots):
            f = fitted[i % len(fitted)]
            plotter.png(f.lc, f.result)
        gc.collect()
        return len(gc.get_objects())

    live_objects(10)  # warm caches
    base = live_objects(10)
    assert live_objects(40) - base < 300  # nothing accumulates per plot
    assert not plotter._ax.lines and not plotter._ax.collections  # artists removed after each plot
    assert plotter.png(fitted[0].lc, fitted[0].result) == first  # same inputs, same picture
    assert plotter.png(fitted[0].lc, salt2.Salt2Result(False, "x"))[:4] == b"\x89PNG"
    plotter.close()


def test_to_json_is_strict():
    body = va.to_json({"a": float("nan"), "b": [1.0, float("inf")], "c": b"\x00\x01", "d": "x"})
    assert json.loads(body) == {"a": None, "b": [1.0, None], "c": "AAE=", "d": "x"}
    import numpy as np

    assert json.loads(va.to_json({"n": np.float32(1.5), "i": np.int64(3)})) == {"n": 1.5, "i": 3}


def test_figure_name():
    assert va.figure_name("ZTF21abiuvdk", 1707409520815015012) == \
        "salt2/plot_lc/ZTF21abiuvdk.1707409520815015012.png"
    assert va.figure_name("a/b c", 1) == "salt2/plot_lc/a_b_c.1.png"


# ---- model files missing: the job stops at start with one message ------------------------------


def test_missing_model_stops_the_job_at_start(tmp_path, monkeypatch):
    empty = tmp_path / "no-model"
    empty.mkdir()
    monkeypatch.setenv("SNCOSMO_DATA_DIR", str(empty))
    sncosmo_data.reset_cache()
    try:
        with pytest.raises(sncosmo_data.ModelDataError, match="salt2_template_0.dat") as e:
            va.FitSalt2("ztf", model_data=str(empty)).setup()
        assert "\n" not in str(e.value)
        with pytest.raises(sncosmo_data.ModelDataError):
            va.check_model_data(str(empty), "ztf")
        # run() refuses before building anything (no services needed)
        with pytest.raises(sncosmo_data.ModelDataError, match="not available offline"):
            va.run(["--survey", "ztf", "--testid", "x", "--project", "pgbctl-local", "--backend", "local",
                    "--sncosmo-data", str(empty)])
        assert va.main(["--survey", "ztf", "--project", "pgbctl-local", "--backend", "local",
                        "--sncosmo-data", str(empty)]) == 2
        with pytest.raises(sncosmo_data.ModelDataError, match="Dataflow workers cannot read a local directory"):
            va.run(["--survey", "ztf", "--project", "my-project", "--backend", "gcp", "--sncosmo-data", str(empty)])
    finally:
        sncosmo_data.reset_cache()


def test_required_model_files():
    files = va.required_model_files("ztf")
    assert "models/salt2/salt2-4/salt2_template_0.dat" in files
    assert {"bandpasses/ztf/P48_g.dat", "bandpasses/ztf/P48_R.dat"} <= set(files)


# ---- the whole graph builds, with names from naming only -----------------------------------------


def test_build_graph_names(monkeypatch):
    from apache_beam.options.pipeline_options import PipelineOptions

    class _E:
        bigquery_url = "http://127.0.0.1:9"

    p = beam.Pipeline(options=PipelineOptions(["--runner", LOCAL_RUNNER, "--streaming"]))
    va.build(p, INST, "local", endpoints=_E(), model_data=None)
    labels = {t.full_label for t in p.transforms_stack[0].parts}
    assert {"Read", "ValueAdded", "Publish_alerts_pure", "Publish_exgalac_trans", "Publish_salt2",
            "Write_salt2", "UploadFigures", "WriteDeadLetters"} <= labels
    from beam_jobs.common import pipeline_args

    assert f"--runner={LOCAL_RUNNER}" in pipeline_args(va.JOB, INST, "local")
    gcp = pipeline_args(va.JOB, INST, "gcp")
    assert "--runner=DataflowRunner" in gcp and f"--job_name={INST.beam_job('value-added')}" in gcp


def test_fast_executor_follows_a_moved_storage_emulator(monkeypatch):
    """Locally, `pgbctl create` restarts the storage emulator, maybe on another port: the
    executor's figure and dead-letter writers follow it (no network needed to check that)."""
    from pgbctl.clients import Clients
    from pgbctl.local import services
    from pgbctl.localrun_value_added import ValueAddedExecutor

    old = services.Endpoints("127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3", "pgbctl-local",
                             home="/nonexistent-home")
    moved = services.Endpoints("127.0.0.1:1", "http://127.0.0.1:4", "http://127.0.0.1:3", "pgbctl-local",
                               home="/nonexistent-home")
    where = {"now": old}
    monkeypatch.setattr(services, "endpoints", lambda home=None, project=None: where["now"])
    ex = ValueAddedExecutor.__new__(ValueAddedExecutor)  # no services: only what refresh needs
    ex.va, ex.inst, ex._store = va, INST, None
    ex.clients = Clients.for_backend("local", INST.project, old)
    try:
        ex._writers(ex.clients)
        assert ex.refresh_storage() is False  # nothing moved
        where["now"] = moved
        assert ex.refresh_storage() is True
        assert ex._store.endpoints.storage_url == "http://127.0.0.1:4"
        assert ex.figures._clients is ex._store and ex.dead_letters._clients is ex._store
        assert ex.figures._bucket.name == INST.bucket("sncosmo")
        assert ex.refresh_storage() is False  # already following
    finally:
        if ex._store is not None:
            ex._store.close()
        ex.clients.close()


class _FakeBlob:
    def __init__(self, store, name):
        self.store, self.name = store, name

    def upload_from_filename(self, path):
        self.store[self.name] = Path(path).read_bytes()

    def download_to_filename(self, path):
        if self.name not in self.store:
            raise FileNotFoundError(self.name)
        Path(path).write_bytes(self.store[self.name])


class _FakeStorage:
    """The slice of google.cloud.storage.Client the model-data helpers use."""

    def __init__(self):
        self.objects: dict[str, dict[str, bytes]] = collections.defaultdict(dict)

    def bucket(self, name):
        store = self.objects[name]
        return type("B", (), {"name": name, "blob": lambda _self, n: _FakeBlob(store, n)})()

    def list_blobs(self, bucket, prefix=None):
        return [type("O", (), {"name": n})() for n in self.objects[bucket] if not prefix or n.startswith(prefix)]


@needs_model
def test_model_data_on_gcs_staged_checked_and_downloaded(tmp_path, monkeypatch):
    """gcp: the launcher stages the model files to gs://<sncosmo bucket>/sncosmo_data, checks
    them there (one message when missing), and workers download them once."""
    gcs = _FakeStorage()
    gcp_inst = naming.Instance("ztf", "unit", "my-project")
    uri = va.default_model_data("gcp", gcp_inst)
    assert uri == f"gs://{gcp_inst.bucket('sncosmo')}/sncosmo_data"
    with pytest.raises(sncosmo_data.ModelDataError, match="not found at gs://.*salt2_template_0.dat"):
        va.check_model_data(uri, "ztf", storage_client=gcs)
    staged = va.stage_model_data(_DATA, uri, "ztf", storage_client=gcs)
    assert sorted(staged) == sorted(va.required_model_files("ztf"))
    assert va.stage_model_data(_DATA, uri, "ztf", storage_client=gcs) == []  # already there
    va.check_model_data(uri, "ztf", storage_client=gcs)
    monkeypatch.setenv("SNCOSMO_DATA_DIR", _DATA)
    monkeypatch.setattr(va, "_DOWNLOADED", {})
    made = iter(range(10))
    monkeypatch.setattr(va.tempfile, "mkdtemp", lambda prefix="": str(tmp_path / f"dl{next(made)}"))
    root = va._download_model_data(uri, "ztf", None, gcs)
    assert sncosmo_data.missing_files(Path(root)) == []
    assert (Path(root) / "bandpasses/ztf/P48_g.dat").read_bytes() == (Path(_DATA) / "bandpasses/ztf/P48_g.dat").read_bytes()
    assert va._download_model_data(uri, "ztf", None, _FakeStorage()) == root  # once per process
    broken = _FakeStorage()
    va.stage_model_data(_DATA, "gs://b/p", "ztf", storage_client=broken)
    del broken.objects["b"]["p/models/salt2/salt2-4/salt2_template_1.dat"]
    with pytest.raises(sncosmo_data.ModelDataError, match="salt2_template_1.dat"):
        va._download_model_data("gs://b/p", "ztf", None, broken)
