"""value-added benchmarks: the SALT2 fit (ours vs a plain ``sncosmo.fit_lc`` loop) and the job's
alert rate with fitting on.

Rows:

* ``value_added.fit_ours`` / ``value_added.fit_plain`` -- fits/s on the same simulated SNe Ia
  (:func:`pgbctl.science.benchmark.fit_rates`; warm, interleaved), and
  ``value_added.fit_speedup`` (ours / plain; the issue's target is ~2.5x).
* ``value_added.job_inprocess`` -- alerts/s of the job's DoFn chain in one process without I/O
  (decode, strip, both filters, JSON messages, quality gate, SALT2 fit, salt2 row, PNG;
  :func:`pgbctl.localrun_value_added.job_rate`) on supernova-like synthetic alerts + the real
  ZTF packets; the note says how many were fitted.
* ``value_added.job_local`` (full run only) -- alerts/s of the fast local executor
  (``pgbctl.localrun_value_added``) on the emulators: published to ``alerts`` first, then
  drained (busy time: first message pulled -> last batch acknowledged), everything written
  (3 topics, salt2 rows, PNGs). ``--workers 2`` is measured too when the machine has 2+ cores.

Needs the SALT2 model files (``SNCOSMO_DATA_DIR`` or ``<shared data>/sncosmo``); without them
the module reports skipped rows. Run alone: ``python -m bench --only value_added``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from bench import create_instance, local_home, log, real_alert_files, row, skipped

FIT_TARGET_SPEEDUP = ">= 2"


def _model_available() -> bool:
    from pgbctl.paths import shared_data_dir
    from pgbctl.science import sncosmo_data

    if not os.environ.get("SNCOSMO_DATA_DIR"):
        shared = shared_data_dir()
        if shared is not None and (shared / "sncosmo").is_dir():
            os.environ["SNCOSMO_DATA_DIR"] = str(shared / "sncosmo")
    d = os.environ.get("SNCOSMO_DATA_DIR")
    from pathlib import Path

    return bool(d) and sncosmo_data.missing_files(Path(d)) == []


def _packets(quick: bool) -> tuple[list[bytes], str]:
    from pgbctl import synth

    n_sn = 40 if quick else 200
    pk = synth.generate(n_sn, seed=21, kind="sn") + synth.generate(n_sn // 4, seed=22)
    real = [p.read_bytes() for p in real_alert_files()]
    label = f"{n_sn} synthetic SN + {n_sn // 4} synthetic mixed"
    if real:
        pk += real
        label += f" + {len(real)} real ZTF"
    return pk, label


def fit_rows(quick: bool) -> list[dict]:
    from pgbctl.science.benchmark import fit_rates

    n = 10 if quick else 40
    log(f"value_added: fitting {n} simulated SNe Ia, ours and plain sncosmo.fit_lc")
    r = fit_rates(n, seed=100)
    agree = f"median |dz|/sigma_z vs plain {r['median_dz_sigma']:.2f}" if r["median_dz_sigma"] is not None else ""
    return [
        row("value_added.fit_ours", r["fits_per_s_ours"], "fits/s", None,
            f"pgbctl salt2.fit, {n} simulated SNe Ia, {r['success_ours']}/{n} succeeded"),
        row("value_added.fit_plain", r["fits_per_s_plain"], "fits/s", None,
            f"plain sncosmo.fit_lc loop, same {n}, {r['success_plain']}/{n} succeeded"),
        row("value_added.fit_speedup", r["speedup"], "x", FIT_TARGET_SPEEDUP, agree),
    ]


def job_inprocess_row(quick: bool) -> dict:
    from pgbctl.localrun_value_added import job_rate

    pk, label = _packets(quick)
    log(f"value_added: job DoFns in-process on {len(pk)} alerts")
    r = job_rate(pk)
    return row("value_added.job_inprocess", r["alerts_per_s"], "alerts/s", None,
               f"{label}; {r['fits']} fitted ({r['fit_succeeded']} ok), "
               f"{r['ms_per_fitted_alert']:.0f} ms per fitted alert (fit+row+PNG); no I/O, 1 process")


def job_local_rows(quick: bool) -> list[dict]:
    """The fast executor on the emulators (one instance, one run per worker count)."""
    from pgbctl import naming
    from pgbctl.clients import Clients
    from pgbctl.local import services
    from pgbctl.localrun_value_added import ValueAddedExecutor

    pk, label = _packets(quick)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    worker_counts = [1] + ([2] if cores >= 2 else [])
    out = []
    with local_home("pgbctl-bench-va-") as home:
        for workers in worker_counts:
            testid = f"benchvaw{workers}"  # a fresh instance per round: same alerts, empty table
            note = create_instance(testid, home=home)
            ep = services.endpoints(home)  # after create: it may restart the storage emulator
            inst = naming.Instance("ztf", testid, ep.project)
            with Clients.for_backend("local", inst.project, ep) as clients:
                topic = clients.topic_path(inst.topic("alerts"))
                for f in [clients.publisher.publish(topic, p) for p in pk]:
                    f.result(timeout=60)
                log(f"value_added: executor on the emulators, {len(pk)} alerts, {workers} worker(s)")
                ex = ValueAddedExecutor(inst, clients, workers=workers, batch=100)
                t0 = time.monotonic()
                c = ex.run(threading.Event(), exit_when_idle=5.0, log_every=30.0, max_messages=len(pk))
                wall = time.monotonic() - t0
            ok = c["in"] == len(pk) and c["failed_batches"] == 0
            extra = {} if ok else {"ok": False}
            out.append(row(f"value_added.job_local_w{workers}", c["alerts_per_s"], "alerts/s", None,
                           f"{label}; fast executor, {workers} DoFn process(es), emulators: {c['fits']} fits, "
                           f"{c['salt2']} salt2 msgs, {c['rows_salt2']} rows, {c['figures']} PNGs; "
                           f"wall {wall:.0f}s" + (f"; {note}" if note else "")
                           + ("" if ok else f"; INCOMPLETE: in={c['in']} failed_batches={c['failed_batches']}"),
                           **extra))
    return out


def run(quick: bool) -> list[dict]:
    if not _model_available():
        why = "SALT2 model files not available (set SNCOSMO_DATA_DIR)"
        return [skipped(n, why) for n in ("value_added.fit_ours", "value_added.fit_plain", "value_added.fit_speedup",
                                          "value_added.job_inprocess")]
    logging.getLogger("beam_jobs.value_added").setLevel(logging.ERROR)  # per-fit failure warnings
    rows = fit_rows(quick)
    rows.append(job_inprocess_row(quick))
    if quick:
        rows.append(skipped("value_added.job_local_w1", "quick run (needs the emulators)", "alerts/s"))
    else:
        rows += job_local_rows(quick)
    return rows
