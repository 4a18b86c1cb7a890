"""Tiny restart-on-crash wrapper: ``python -m pgbctl.local.supervise STATUS_FILE MAX_RESTARTS -- ARGV...``

Runs ARGV as a child in the wrapper's own process group (so ``killpg`` reaches both),
restarts it when it exits non-zero (exponential back-off, at most MAX_RESTARTS times; 0 exit
is final), and stops without restarting once it receives SIGTERM/SIGINT (which it forwards
to the child in case only the wrapper was signalled).  It writes ``{child_pid, restarts,
last_exit, state}`` to STATUS_FILE after every change.  Used by
:func:`pgbctl.local.services.start_process` when ``restart_on_crash=True``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    status_file, max_restarts, cmd = argv[0], int(argv[1]), argv[3:]
    stopping = False
    child: subprocess.Popen | None = None
    restarts = 0
    last_exit: int | None = None

    def write(state: str) -> None:
        tmp = f"{status_file}.tmp"
        with open(tmp, "w") as fh:
            json.dump({"wrapper_pid": os.getpid(), "child_pid": child.pid if child else None,
                       "restarts": restarts, "last_exit": last_exit, "state": state, "time": time.time()}, fh)
        os.replace(tmp, status_file)

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    while True:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        write("running")
        while True:
            try:
                last_exit = child.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
        if stopping or last_exit == 0 or restarts >= max_restarts:
            write("stopped" if stopping else ("exited" if last_exit == 0 else "gave-up"))
            return last_exit if last_exit is not None else 0
        restarts += 1
        delay = min(30.0, 0.5 * 2 ** (restarts - 1))
        print(f"[pgbctl.supervise] child exited with {last_exit}; restart {restarts}/{max_restarts} in {delay:.1f}s",
              file=sys.stderr, flush=True)
        write("backoff")
        deadline = time.monotonic() + delay
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.1)
        if stopping:
            write("stopped")
            return last_exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
