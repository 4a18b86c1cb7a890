"""A tiny status-file protocol between long-running local processes and whoever supervises
them (``pgbctl night``).

A process started with ``$PGBCTL_STATUS_FILE`` set rewrites that file (atomically, JSON) about
once a second and when it stops::

    {"process": "upload_bytes_to_bucket", "pid": 123, "state": "running" | "stopped",
     "in_flight": 0,          # messages pulled and not yet acked or handed back
     "last_activity": 1.7e9,  # wall time a message was last pulled or finished
     "updated": 1.7e9, "started": 1.7e9,
     "counts": {"in": 10, "acked": 10, ...}}   # process-specific counters

``pgbctl night end`` waits until every process reports ``in_flight == 0`` with no activity
for a moment (and its subscription is empty), stops the processes, and reports the final
``counts``. Processes that do not write the file are drained on their subscription alone.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

ENV = "PGBCTL_STATUS_FILE"


def write(path: str | Path, status: dict[str, Any]) -> None:
    """Write ``status`` to ``path`` atomically (readers never see half a file)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, sort_keys=True, default=str))
    os.replace(tmp, p)


def read(path: str | Path | None) -> dict[str, Any] | None:
    """The status in ``path``, or None when there is none (or it cannot be read)."""
    if not path:
        return None
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


class StatusWriter:
    """Calls ``snapshot()`` every ``every`` seconds in a daemon thread and writes the result
    (plus ``process``, ``pid``, ``state``, ``updated``, ``started``) to ``path``.
    ``path=None`` (``$PGBCTL_STATUS_FILE`` unset) makes it a no-op."""

    def __init__(self, process: str, snapshot: Callable[[], dict[str, Any]], path: str | Path | None = None,
                 every: float = 1.0):
        self.path = path if path is not None else os.environ.get(ENV) or None
        self.process = process
        self.snapshot = snapshot
        self.every = every
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, state: str) -> None:
        if not self.path:
            return
        try:
            d = dict(self.snapshot())
            d.update(process=self.process, pid=os.getpid(), state=state, updated=time.time(), started=self.started)
            write(self.path, d)
        except Exception:  # noqa: BLE001 - a status file must never take the process down
            pass

    def start(self) -> "StatusWriter":
        if self.path and self._thread is None:
            self._write("running")

            def loop() -> None:
                while not self._stop.wait(self.every):
                    self._write("running")

            self._thread = threading.Thread(target=loop, name="status-writer", daemon=True)
            self._thread.start()
        return self

    def stop(self, state: str = "stopped") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._write(state)
