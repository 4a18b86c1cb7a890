"""Benchmarks of pgbctl: speed and memory targets live here, not in timed tests.

Run them all with ``make bench`` (``python -m bench``); see ``python -m bench --help``.

Each benchmark module exposes ``run(quick: bool) -> list[dict]``; a result row has the keys
``benchmark``, ``value``, ``unit``, ``target`` (optional: ``">= N"``, ``"<= N"`` or ``"A..B"``)
and ``note``. A row may carry ``ok`` itself; otherwise ``__main__`` judges it from ``target``.
This package holds the helpers the modules share.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
#: the modules ``python -m bench`` runs, in order (``value_added`` is optional)
MODULES = ("codec", "pubsub", "e2e", "value_added")
REAL_ALERTS_GLOB = "ztf/alerts/*.avro"


def row(benchmark: str, value: Any, unit: str, target: str | None = None, note: str = "", **extra: Any) -> dict:
    """One result row (``value`` rounded for display; None when the benchmark did not run)."""
    if isinstance(value, float):
        value = round(value, 3 if abs(value) < 10 else 1)
    d = {"benchmark": benchmark, "value": value, "unit": unit, "target": target, "note": note}
    d.update(extra)
    return d


def skipped(benchmark: str, why: str, unit: str = "", target: str | None = None) -> dict:
    return row(benchmark, None, unit, target, f"skipped: {why}")


def log(msg: str) -> None:
    """Progress on stderr (stdout is for the table or the JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- targets -----------------------------------------------------------------------------------

_CMP = re.compile(r"^\s*(>=|<=|>|<)\s*([-+0-9.eE]+)")
_RANGE = re.compile(r"^\s*([-+0-9.eE]+)\s*\.\.\s*([-+0-9.eE]+)")


def meets(value: Any, target: str | None) -> bool | None:
    """Whether ``value`` meets ``target`` (None when there is nothing to judge)."""
    if target is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    m = _CMP.match(target)
    if m:
        op, x = m.group(1), float(m.group(2))
        return {">=": value >= x, "<=": value <= x, ">": value > x, "<": value < x}[op]
    m = _RANGE.match(target)
    if m:
        return float(m.group(1)) <= value <= float(m.group(2))
    return None


# ---- inputs ------------------------------------------------------------------------------------


def real_alert_files() -> list[Path]:
    """The real ZTF packets of the shared data folder (empty when not present)."""
    from pgbctl import paths

    d = paths.shared_data_dir()
    return sorted(Path(p) for p in glob.glob(str(d / REAL_ALERTS_GLOB))) if d else []


def alert_packets(n_synthetic: int = 100) -> tuple[list[bytes], str]:
    """ZTF-sized alert packets: the real ones when present, else ``n_synthetic`` generated
    ones with ZTF-like (~70 KB) cutouts. Returns ``(packets, label)``."""
    files = real_alert_files()
    if files:
        return [p.read_bytes() for p in files], f"{len(files)} real ZTF packets"
    from pgbctl import synth

    return synth.generate(n_synthetic, seed=7, cutout_bytes=20_000), f"{n_synthetic} synthetic packets"


def cycle(packets: list[bytes], n: int) -> Iterator[bytes]:
    for i in range(n):
        yield packets[i % len(packets)]


# ---- machine -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import platform

    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {
        "cores": usable,
        "cpu_count": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": mem_gb,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


# ---- local services and the CLI ------------------------------------------------------------------


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is not None:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def local_home(prefix: str = "pgbctl-bench-", *, pubsub_java_opts: str | None = None) -> Iterator[Path]:
    """A fresh PGBCTL home with the local services up; services (and any process started
    in that home) stopped and the folder removed on exit, whatever happens. ``PGBCTL_HOME``
    points at it meanwhile (for the CLI and for code calling ``services.endpoints()``).

    ``pubsub_java_opts``: JAVA_OPTS of the Pub/Sub emulator (default: pgbctl's, -Xmx1g)."""
    from pgbctl.local import services

    home = Path(tempfile.mkdtemp(prefix=prefix))
    with _env(PGBCTL_HOME=str(home)):
        try:
            t0 = time.monotonic()
            with _env(PGBCTL_PUBSUB_JAVA_OPTS=pubsub_java_opts):
                services.up(home=home, timeout=120)
            log(f"local services up in {time.monotonic() - t0:.1f}s ({home})")
            yield home
        finally:
            try:
                res = services.down(home=home)
                log(f"local services down: {res}")
            finally:
                shutil.rmtree(home, ignore_errors=True)


def pgbctl_exe() -> list[str]:
    exe = Path(sys.executable).with_name("pgbctl")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pgbctl.cli.main"]


def cli(args: list[str], *, home: Path, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``pgbctl ARGS`` with ``PGBCTL_HOME=home`` (local backend); output captured."""
    env = dict(os.environ, PGBCTL_HOME=str(home), PGBCTL_BACKEND="local")
    p = subprocess.run([*pgbctl_exe(), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"pgbctl {' '.join(args)} exited {p.returncode}: " + " | ".join(tail))
    return p


def create_instance(testid: str, *, home: Path, survey: str = "ztf") -> str:
    """``pgbctl create --testid T --yes``, retried once (a local service that died meanwhile is
    restarted by the retry); returns a note ("" or what went wrong the first time)."""
    args = ["--survey", survey, "create", "--testid", testid, "--yes"]
    try:
        cli(args, home=home, timeout=300)
        return ""
    except RuntimeError as e:
        log(f"{e}; retrying once")
        cli(args, home=home, timeout=300)
        return f"create retried after: {str(e)[:160]}"


def cli_json(args: list[str], *, home: Path, timeout: float = 600) -> Any:
    """``pgbctl --json ARGS`` → the parsed JSON it printed on stdout."""
    p = cli(["--json", *args], home=home, timeout=timeout)
    out = p.stdout.strip()
    try:
        return json.loads(out)
    except ValueError:
        # the last JSON document on stdout
        start = out.rfind("\n{")
        return json.loads(out[start + 1 :] if start >= 0 else out)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
