"""What Cloud Function handlers share, and the local runtime that serves them.

On gcp a handler runs inside Cloud Functions; locally :func:`serve` runs it in a supervised
subscriber process: it pulls from the function's trigger subscription, wraps each message in
the same CloudEvent a Pub/Sub trigger delivers, calls the handler, and acks only what the
handler finished (an exception nacks the message, which is then redelivered).
"""

from __future__ import annotations

import base64
import functools
import json
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

from pgbctl import naming
from pgbctl.paths import FUNCTIONS_DIR

log = logging.getLogger(__name__)
# the emulator needs return_immediately (see pull_batch); the client warns on every pull
warnings.filterwarnings("ignore", message="The return_immediately flag is deprecated", category=DeprecationWarning)


@dataclass
class FunctionEnv:
    inst: naming.Instance
    backend: str

    @classmethod
    def from_environ(cls, environ=os.environ) -> "FunctionEnv":
        project = environ.get("GCP_PROJECT") or environ.get("GOOGLE_CLOUD_PROJECT") or "pgbctl-local"
        inst = naming.Instance(environ.get("PGBCTL_SURVEY", "ztf"), environ.get("PGBCTL_TESTID") or None, project)
        return cls(inst, environ.get("PGBCTL_BACKEND", "gcp"))

    @functools.cached_property
    def clients(self):
        from pgbctl.clients import Clients

        endpoints = None
        if self.backend == "local":
            from pgbctl.local import services

            endpoints = services.endpoints()
        return Clients.for_backend(self.backend, self.inst.project, endpoints)

    @functools.cached_property
    def schema_map(self):
        """The map uploaded to the instance's broker_files bucket (components fetch it fresh),
        falling back to the packaged copy when the bucket has none."""
        from pgbctl import schemamap

        try:
            blob = self.clients.storage.bucket(self.inst.bucket("broker_files")).blob(
                f"schema_maps/{self.inst.survey}.yaml")
            return schemamap.SchemaMap.from_yaml(blob.download_as_bytes(), origin=f"gs://{blob.bucket.name}/{blob.name}")
        except Exception as e:  # noqa: BLE001
            log.warning("schema map not readable from broker_files (%s); using the packaged copy", e)
            return schemamap.load(self.inst.survey)

    def topic_path(self, stub: str) -> str:
        return f"projects/{self.inst.project}/topics/{self.inst.topic(stub)}"


def cloud_event(received, subscription_path: str):
    """The CloudEvent a Pub/Sub trigger delivers for ``received`` (a ReceivedMessage)."""
    from cloudevents.http import CloudEvent

    m = received.message
    attributes = {
        "type": "google.cloud.pubsub.topic.v1.messagePublished",
        "source": f"//pubsub.googleapis.com/{subscription_path}",
        "id": m.message_id or "local",
    }
    data = {
        "message": {
            "data": base64.b64encode(m.data).decode(),
            "attributes": dict(m.attributes),
            "messageId": m.message_id,
            "publishTime": m.publish_time.isoformat() if m.publish_time else None,
        },
        "subscription": subscription_path,
    }
    return CloudEvent(attributes, data)


def load_module(function: str):
    """Import ``functions/<function>/main.py`` (as Cloud Functions would)."""
    path = FUNCTIONS_DIR / function / "main.py"
    if not path.is_file():
        raise FileNotFoundError(f"no function {function!r} ({path})")
    spec = importlib.util.spec_from_file_location(f"pgbctl_function_{function}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_handler(function: str, entry: str = "run"):
    return getattr(load_module(function), entry)


class _Flow:
    """Counters and ack bookkeeping of :func:`serve` (shared by the worker threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acks: list[str] = []
        self.nacks: list[str] = []
        self.in_flight = 0
        self.received = 0
        self.acked = 0
        self.failed = 0
        self.outcomes: dict[str, int] = {}
        self.last_activity = time.time()
        self.first = self.last = None  # monotonic times of the first pull / last finished message

    def done(self, ack_id: str, outcome: str | None) -> None:
        with self.lock:
            self.in_flight -= 1
            self.last_activity = time.time()
            self.last = time.monotonic()
            if outcome is None:
                self.nacks.append(ack_id)
                self.failed += 1
            else:
                self.acks.append(ack_id)
                self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def take(self) -> tuple[list[str], list[str]]:
        with self.lock:
            a, n = self.acks, self.nacks
            self.acks, self.nacks = [], []
            return a, n

    def snapshot(self) -> dict:
        with self.lock:
            busy = (self.last - self.first) if (self.first is not None and self.last is not None) else 0.0
            return {
                "in_flight": self.in_flight + len(self.acks) + len(self.nacks),
                "last_activity": self.last_activity,
                "counts": {"in": self.received, "acked": self.acked, "failed": self.failed, **self.outcomes,
                           "busy_seconds": round(busy, 2),
                           "per_s": round(self.acked / busy, 1) if busy > 0 else None},
            }


def serve(function: str, subscription_path: str, *, workers: int = 4, batch: int = 100,
          max_outstanding: int | None = None, stop: threading.Event | None = None,
          status_file: str | None = None) -> dict:
    """Pull → handler → ack, until SIGTERM/SIGINT or ``stop``; returns the final counts.

    Messages flow continuously: up to ``max_outstanding`` (default ``25 * workers``) are
    handled at once by ``workers`` threads, each acknowledged as soon as its handler returned
    (the handler's return value, e.g. ``stored``/``exists``/``dead_letter``, is counted) and
    handed back for redelivery (ack deadline 0) when it raised. On stop, nothing new is
    pulled and what is in hand is finished and acknowledged before returning.
    ``status_file`` (default ``$PGBCTL_STATUS_FILE``): see :mod:`pgbctl.procstatus`.
    """
    
    from concurrent.futures import ThreadPoolExecutor

    from pgbctl import procstatus

    handler = load_handler(function)
    env = FunctionEnv.from_environ()
    sub = env.clients.subscriber
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread (tests)
            pass
    limit = max_outstanding or 25 * workers
    flow = _Flow()
    status = procstatus.StatusWriter(function, flow.snapshot, status_file).start()

    def call(rm) -> None:
        outcome = None
        try:
            res = handler(cloud_event(rm, subscription_path))
            outcome = res if isinstance(res, str) and res else "ok"
        except Exception:  # noqa: BLE001 - the message is redelivered
            log.exception("handler failed on message %s; it will be redelivered", rm.message.message_id)
        flow.done(rm.ack_id, outcome)

    def flush() -> None:
        acks, nacks = flow.take()
        for i in range(0, len(acks), 500):
            try:
                sub.acknowledge(request={"subscription": subscription_path, "ack_ids": acks[i : i + 500]})
                with flow.lock:
                    flow.acked += len(acks[i : i + 500])
            except Exception as e:  # noqa: BLE001 - handled again after the ack deadline (idempotent)
                log.warning("acknowledge failed (%s); %d messages will be redelivered", e, len(acks[i : i + 500]))
        for i in range(0, len(nacks), 500):
            try:
                sub.modify_ack_deadline(request={"subscription": subscription_path, "ack_ids": nacks[i : i + 500],
                                                 "ack_deadline_seconds": 0})
            except Exception as e:  # noqa: BLE001 - they come back after the ack deadline anyway
                log.warning("nack failed (%s)", e)

    log.info("serving %s from %s (%d workers)", function, subscription_path, workers)
    pool = ThreadPoolExecutor(workers, thread_name_prefix=function)
    last_log = time.monotonic()
    last_pull_warning = -1e9
    try:
        while not stop.is_set():
            flush()
            if time.monotonic() - last_log > 10:
                log.info("%s: %s", function, flow.snapshot()["counts"])
                last_log = time.monotonic()
            room = limit - flow.in_flight
            if room <= 0:
                stop.wait(0.005)
                continue
            try:
                # return_immediately: the emulator holds an empty pull ~30 s, and a pull
                # abandoned on a client deadline may still lease messages (invisible for a
                # whole ack deadline)
                resp = sub.pull(request={"subscription": subscription_path, "max_messages": min(batch, room),
                                         "return_immediately": True}, timeout=30)
            except Exception as e:  # noqa: BLE001 - emulator restarting, subscription re-created: retry
                now = time.monotonic()
                if now - last_pull_warning > 60:  # not once a second for hours
                    log.warning("pull failed (retrying every second, next warning in 60 s): %s",
                                " ".join(str(e).split())[:300])
                    last_pull_warning = now
                stop.wait(1)
                continue
            msgs = list(resp.received_messages)
            if not msgs:
                stop.wait(0.05)
                continue
            with flow.lock:
                flow.in_flight += len(msgs)
                flow.received += len(msgs)
                flow.last_activity = time.time()
                if flow.first is None:
                    flow.first = time.monotonic()
            for rm in msgs:
                pool.submit(call, rm)
    finally:
        pool.shutdown(wait=True)  # finish what is in hand
        flush()
        status.stop()
    counts = flow.snapshot()["counts"]
    log.info("stopped %s: %s", function, counts)
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Serve a pgbctl Cloud Function from a Pub/Sub subscription.")
    ap.add_argument("function")
    ap.add_argument("--subscription", required=True, help="full subscription path")
    ap.add_argument("--workers", type=int, default=4,
                    help="handler threads (4: uploads wait ~3 ms on the emulator; more threads only add GIL contention)")
    ap.add_argument("--status-file", default=None, help="see pgbctl.procstatus (default $PGBCTL_STATUS_FILE)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("google", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    counts = serve(a.function, a.subscription, workers=a.workers, status_file=a.status_file)
    # the final summary, one JSON line on stdout (as pgbctl.localrun prints)
    print(json.dumps({"function": a.function, "subscription": a.subscription, **counts}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
