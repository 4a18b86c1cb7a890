"""What Cloud Function handlers share, and the local runtime that serves them.

On gcp a handler runs inside Cloud Functions; locally :func:`serve` runs it in a supervised
subscriber process: it pulls from the function's trigger subscription, wraps each message in
the same CloudEvent a Pub/Sub trigger delivers, calls the handler, and acks only what the
handler finished (an exception nacks the message, which is then redelivered).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pgbctl import naming
from pgbctl.paths import FUNCTIONS_DIR

log = logging.getLogger(__name__)


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


def serve(function: str, subscription_path: str, *, workers: int = 8, batch: int = 200,
          stop: threading.Event | None = None) -> None:
    """Pull → handler → ack, until SIGTERM/SIGINT (finishing what was pulled) or ``stop``."""
    handler = load_handler(function)
    env = FunctionEnv.from_environ()
    sub = env.clients.subscriber
    stop = stop or threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, lambda *_: stop.set())
        except ValueError:  # not the main thread (tests)
            pass
    handled = failed = 0
    log.info("serving %s from %s", function, subscription_path)
    with ThreadPoolExecutor(workers) as pool:
        while not stop.is_set():
            try:
                resp = sub.pull(request={"subscription": subscription_path, "max_messages": batch}, timeout=10)
            except Exception as e:  # noqa: BLE001 - emulator restarting, deadline: retry
                log.warning("pull failed: %s", e)
                time.sleep(1)
                continue
            msgs = list(resp.received_messages)
            if not msgs:
                time.sleep(0.05)
                continue

            def call(rm):
                try:
                    handler(cloud_event(rm, subscription_path))
                    return rm.ack_id, None
                except Exception as e:  # noqa: BLE001
                    log.exception("handler failed on message %s", rm.message.message_id)
                    return rm.ack_id, e

            results = list(pool.map(call, msgs))
            ok = [a for a, e in results if e is None]
            bad = [a for a, e in results if e is not None]
            if ok:
                sub.acknowledge(request={"subscription": subscription_path, "ack_ids": ok})
            if bad:
                sub.modify_ack_deadline(request={"subscription": subscription_path, "ack_ids": bad,
                                                 "ack_deadline_seconds": 0})
            handled += len(ok)
            failed += len(bad)
    log.info("stopped %s: %d handled, %d failed (redelivered)", function, handled, failed)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Serve a pgbctl Cloud Function from a Pub/Sub subscription.")
    ap.add_argument("function")
    ap.add_argument("--subscription", required=True, help="full subscription path")
    ap.add_argument("--workers", type=int, default=8)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    serve(a.function, a.subscription, workers=a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
