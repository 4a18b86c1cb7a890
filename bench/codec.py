"""Codec benchmarks: decoding alert packets, building warehouse rows, generating alerts, memory.

Rows:

* ``codec.fastavro_reader`` -- raw ``fastavro.reader`` on each single-record container (parses the
  header schema every time, as a naive consumer does).
* ``codec.decode_rows`` -- what the sinks do per alert: ``pgbctl.codec.decode`` (schema parse
  cached per header) + ``strip_cutouts`` + ``rows.alerts_row`` + ``rows.diasource_row``.
* ``synth.generate`` -- deterministic synthetic alerts (default and ZTF-sized cutouts).
* ``codec.peak_rss_*`` -- peak RSS (``getrusage``) of a fresh process decoding 5,000 alerts,
  streaming (decode → rows → drop) and (full run only) holding the 5,000 decoded alerts.

Inputs: the real ZTF packets of the shared data folder when present, else synthetic ~70 KB ones.
Run alone: ``python -m bench --only codec``.
"""

from __future__ import annotations

import io
import json
import resource
import subprocess
import sys
import time

from bench import alert_packets, cycle, log, row

RSS_ALERTS = 5000


def _rate(fn, packets: list[bytes], n: int, reps: int) -> float:
    """Best of ``reps`` runs of ``n // reps`` calls (the machine may be shared: best-of
    filters out the other load)."""
    for p in packets[:3]:  # warm-up: schema parse, imports
        fn(p)
    k = max(1, n // reps)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        for p in cycle(packets, k):
            fn(p)
        best = max(best, k / (time.perf_counter() - t0))
    return best


def _fastavro_reader(data: bytes):
    import fastavro

    return next(iter(fastavro.reader(io.BytesIO(data))))


def _decode_rows_fn():
    from pgbctl import codec, rows, schemamap

    smap = schemamap.load("ztf")

    def one(data: bytes):
        alert = codec.decode(data)
        stripped = codec.strip_cutouts(alert, smap)
        return stripped, rows.alerts_row(alert, smap), rows.diasource_row(alert, smap)

    return one


def _rss_child(n: int, hold: bool) -> dict:
    """In a fresh process: peak RSS after loading inputs, then after decoding ``n`` alerts."""
    packets, label = alert_packets()
    one = _decode_rows_fn()
    one(packets[0])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from pgbctl import codec

    kept = []
    t0 = time.perf_counter()
    for p in cycle(packets, n):
        if hold:
            kept.append(codec.decode(p))
        else:
            one(p)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"base_kb": base, "peak_kb": peak, "n": n, "seconds": dt, "inputs": label, "held": len(kept)}


def _rss(n: int, hold: bool) -> dict:
    code = f"import json, bench.codec as c; print(json.dumps(c._rss_child({n}, {hold})))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       cwd=str(__import__("bench").REPO))
    if p.returncode != 0:
        raise RuntimeError(f"RSS child failed: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def run(quick: bool) -> list[dict]:
    from pgbctl import synth

    packets, label = alert_packets()
    size_kb = sum(map(len, packets)) / len(packets) / 1024
    n, reps = (1000, 3) if quick else (10_000, 5)
    out = []

    log(f"codec: fastavro.reader x{n} ({label}, mean {size_kb:.0f} KB)")
    r = _rate(_fastavro_reader, packets, n, reps)
    out.append(row("codec.fastavro_reader", r, "alerts/s", None,
                   f"raw fastavro.reader per packet (parses the header schema each time); "
                   f"{label}, {size_kb:.0f} KB mean; best of {reps}"))

    log(f"codec: decode + strip cutouts + rows x{n}")
    r = _rate(_decode_rows_fn(), packets, n, reps)
    out.append(row("codec.decode_rows", r, "alerts/s", ">= 300",
                   f"codec.decode + strip_cutouts + alerts_row + diasource_row, one core; best of {reps}"))

    ns = 60 if quick else 300
    for name, kw, what in (("synth.generate", {}, "default (small) cutouts"),
                           ("synth.generate_70kb", {"cutout_bytes": 20_000}, "cutout_bytes=20000")):
        log(f"codec: {name} x{ns}")
        synth.generate(5, seed=99, **kw)  # warm-up (schema, sncosmo model)
        best, kb = 0.0, 0.0
        for rep in range(3):
            t0 = time.perf_counter()
            got = synth.generate(ns // 3, seed=1 + rep, **kw)
            best = max(best, len(got) / (time.perf_counter() - t0))
            kb = sum(map(len, got)) / len(got) / 1024
        out.append(row(name, best, "alerts/s", None,
                       f"{what}, {kb:.0f} KB mean, {1000 / best:.1f} ms/alert, mixed kinds; best of 3"))

    rss_cases = [(False, "codec.peak_rss_stream", "<= 512")]
    if not quick:
        rss_cases.append((True, "codec.peak_rss_hold", None))
    for hold, name, target in rss_cases:
        log(f"codec: {name} ({RSS_ALERTS} alerts, fresh process)")
        d = _rss(RSS_ALERTS, hold)
        peak_mb, base_mb = d["peak_kb"] / 1024, d["base_kb"] / 1024
        what = ("decode → strip → rows, nothing kept" if not hold
                else f"all {RSS_ALERTS} decoded alerts (with cutouts) kept in memory")
        out.append(row(name, peak_mb, "MB", target,
                       f"{RSS_ALERTS} alerts: {what}; +{peak_mb - base_mb:.0f} MB over {base_mb:.0f} MB after imports"))
    return out


if __name__ == "__main__":
    for r in run("--quick" in sys.argv):
        print(r)
