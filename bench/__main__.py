"""``python -m bench`` (``make bench``): run the benchmarks, print a table, save the results.

    python -m bench                      # everything (< 15 min)
    python -m bench --quick              # short run (< 3 min)
    python -m bench --only codec,pubsub  # some modules
    python -m bench --json               # JSON on stdout instead of the table

Results are written to ``bench/results/latest.json`` (git-ignored; ``--out`` to change).
Exit code: 0, or 1 when a benchmark raised (a missed target is reported, not fatal, unless
``--strict``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench import MODULES, log, machine, meets, row

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "latest.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description="Run pgbctl's benchmarks.")
    p.add_argument("--quick", action="store_true", help="short run (< 3 minutes in all)")
    p.add_argument("--only", default=None, metavar="NAME,...",
                   help=f"comma-separated modules to run (default: all of {', '.join(MODULES)})")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout instead of a table")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    a = p.parse_args(argv)
    if a.only:
        a.only = [x.strip() for x in a.only.split(",") if x.strip()]
        unknown = [x for x in a.only if x not in MODULES]
        if unknown:
            p.error(f"unknown benchmark module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    else:
        a.only = list(MODULES)
    return a


def run_module(name: str, quick: bool) -> tuple[list[dict], bool]:
    """``(rows, errored)``: the module's rows; a missing optional module or a crash is one row."""
    try:
        mod = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench.{name}":
            return [row(name, None, "", None, "skipped: module not present yet")], False
        raise
    t0 = time.monotonic()
    try:
        rows = list(mod.run(quick))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one module failing must not hide the others
        traceback.print_exc(file=sys.stderr)
        return [row(name, None, "", None, f"error: {type(e).__name__}: {' '.join(str(e).split())[:200]}")], True
    log(f"{name}: {len(rows)} result(s) in {time.monotonic() - t0:.1f}s")
    for r in rows:
        r.setdefault("module", name)
    return rows, False


def render(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    con = Console(width=None if sys.stdout.isatty() else 160)
    con.print(f"[bold]pgbctl benchmarks[/bold] ({'quick' if results['quick'] else 'full'} run, "
              f"{results['started']}, {results['duration_s']:.0f} s)")
    con.print(f"machine: {m['cores']} cores ({m['cpu']}), {m['ram_gb']} GB RAM, load average {m.get('load_avg')} "
              f"at start, {m.get('load_avg_end')} at end, Python {m['python']}, {m['platform']}")
    ms = results.get("module_stats") or {}
    if ms:
        con.print("modules: " + ", ".join(f"{n} {d['seconds']:.0f} s (1-min load {d['load_start']}→{d['load_end']})"
                                          for n, d in ms.items()))
    t = Table(show_lines=False)
    for c, kw in (("benchmark", {}), ("value", {"justify": "right"}), ("unit", {}), ("target", {}),
                  ("ok", {"justify": "center"}), ("note", {"overflow": "fold"})):
        t.add_column(c, no_wrap=c in ("benchmark", "value", "unit", "target", "ok"), **kw)
    for r in results["results"]:
        v = r.get("value")
        vs = "-" if v is None else (f"{v:,.1f}" if isinstance(v, float) and abs(v) >= 10 else f"{v:,}" if isinstance(v, int) else str(v))
        ok = r.get("ok")
        oks = "-" if ok is None else ("[green]yes[/green]" if ok else "[red]NO[/red]")
        t.add_row(r["benchmark"], vs, r.get("unit") or "", r.get("target") or "", oks, r.get("note") or "")
    con.print(t)
    con.print(f"results: {results['out']}")


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    mach = machine()
    log(f"machine: {mach['cores']} cores, {mach['ram_gb']} GB RAM; modules: {', '.join(a.only)}"
        + (" (quick)" if a.quick else ""))
    started = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    t0 = time.monotonic()
    rows: list[dict] = []
    errored = False
    stats: dict[str, dict] = {}
    for name in a.only:
        log(f"== {name}")
        t1, load0 = time.monotonic(), os.getloadavg()[0]
        got, err = run_module(name, a.quick)
        rows += got
        errored |= err
        stats[name] = {"seconds": round(time.monotonic() - t1, 1), "load_start": round(load0, 2),
                       "load_end": round(os.getloadavg()[0], 2)}
    for r in rows:
        if "ok" not in r:
            r["ok"] = meets(r.get("value"), r.get("target"))
    mach["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    results = {"started": started, "quick": a.quick, "duration_s": round(time.monotonic() - t0, 1),
               "machine": mach, "modules": a.only, "module_stats": stats, "out": str(a.out), "results": rows}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    if a.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        render(results)
    missed = [r["benchmark"] for r in rows if r.get("ok") is False]
    if missed:
        log(f"targets missed: {', '.join(missed)}")
    return 1 if errored or (a.strict and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
