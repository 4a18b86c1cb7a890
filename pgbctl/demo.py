"""The main job: one local broker night, start to finish, ending with the status summary.

    python -m pgbctl.demo [--testid demo] [--synthetic 300] [--rate 100] [--keep]

Each step is a real ``pgbctl`` command, echoed before it runs, so the output doubles as a
tutorial: start the local services, (re)create the instance, start the night, feed it
synthetic alerts (and the real ZTF alerts of ``../shared/data/ztf/alerts`` when present),
end the night (drains what is in flight), and print ``pgbctl status``. The services are
left running so you can look around (``pgbctl query ...``); ``pgbctl local down`` stops them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pgbctl import paths


def _pgbctl(args: list[str], *, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pgbctl", *args]
    shown = "pgbctl " + " ".join(shlex.quote(a) for a in args)
    print(f"\n\033[1m$ {shown}\033[0m", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None, text=True)
    print(f"  ({time.monotonic() - t0:.1f}s, exit {r.returncode})", file=sys.stderr, flush=True)
    if r.returncode != 0:
        raise SystemExit(f"demo: step failed: {shown} (exit {r.returncode})")
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pgbctl.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--testid", default="demo")
    ap.add_argument("--survey", default="ztf")
    ap.add_argument("--synthetic", type=int, default=300, help="synthetic alerts to publish (0: none)")
    ap.add_argument("--rate", default="100", help="publish rate for the synthetic alerts (pgbctl simulate --rate)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the instance's earlier contents (default: start fresh)")
    a = ap.parse_args(argv)
    inst = ["--survey", a.survey, "--testid", a.testid]
    t0 = time.monotonic()

    _pgbctl(["local", "up"])
    if not a.keep:
        _pgbctl(["night", "end", *inst, "--timeout", "30"]) if _has_night() and _night_running(inst) else None
        _pgbctl(["delete", *inst, "--yes"])
    _pgbctl(["create", *inst, "--yes"])
    night = _has_night()
    if night:
        jobs = [] if _salt2_model_available() else ["--jobs", "bq-sink"]
        if jobs:
            print("demo: no SALT2 model files (SNCOSMO_DATA_DIR or ../shared/data/sncosmo): "
                  "running the night without the value-added job", file=sys.stderr)
        _pgbctl(["night", "start", *inst, "--kafka-topic", "NONE", *jobs])
    else:
        print("demo: `pgbctl night` is not available in this version; alerts stay in the topic", file=sys.stderr)
    published = 0
    if a.synthetic > 0:
        r = _pgbctl(["simulate", *inst, "--synthetic", "--seed", str(a.seed), "--count", str(a.synthetic),
                     "--rate", a.rate, "--json"], capture=True)
        published += json.loads(r.stdout)["published"]
    shared = paths.shared_data_dir()
    real = shared / a.survey / "alerts" if shared else None
    if real is not None and real.is_dir() and any(real.glob("*.avro")):
        r = _pgbctl(["simulate", *inst, "--from-dir", str(real), "--rate", "max", "--json"], capture=True)
        published += json.loads(r.stdout)["published"]
    else:
        print(f"demo: no real alerts ({real or 'no ../shared/data'}); synthetic only", file=sys.stderr)
    if night:
        _pgbctl(["night", "end", *inst])
    _pgbctl(["status", *inst])
    print(f"\ndemo: published {published} alerts; whole night {time.monotonic() - t0:.0f}s. "
          f"Try: pgbctl query --testid {a.testid} \"SELECT objectId, candid FROM alerts LIMIT 5\"; "
          f"stop everything with: pgbctl local down", file=sys.stderr)
    return 0


def _salt2_model_available() -> bool:
    from pgbctl.science.sncosmo_data import missing_files

    shared = paths.shared_data_dir()
    root = os.environ.get("SNCOSMO_DATA_DIR") or (str(shared / "sncosmo") if shared else None)
    return bool(root) and not missing_files(Path(root))


def _has_night() -> bool:
    return importlib.util.find_spec("pgbctl.cli.night") is not None


def _night_running(inst: list[str]) -> bool:
    try:
        from pgbctl.local import services

        survey, testid = inst[1], inst[3]
        return any(n.startswith(f"{survey}-") and n.endswith(f"-{testid}") and p.running
                   for n, p in services.list_processes().items())
    except Exception:  # noqa: BLE001 - best effort
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
