"""Helpers shared by the integration tests (imported as ``from itest_helpers import ...``)."""

from __future__ import annotations

import time

from typer.testing import CliRunner


def cli(*args: str) -> tuple[int, str, str]:
    """Run ``pgbctl ARGS`` in-process: (exit code, stdout, stderr)."""
    from pgbctl.cli.main import app

    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr


def pull_all(clients, sub: str) -> list:
    """Every message waiting in ``sub`` (pulled and acknowledged)."""
    path = clients.subscription_path(sub)
    out = []
    while True:
        r = clients.subscriber.pull(request={"subscription": path, "max_messages": 1000, "return_immediately": True},
                                    timeout=30)
        if not r.received_messages:
            return out
        out += r.received_messages
        clients.subscriber.acknowledge(request={"subscription": path, "ack_ids": [m.ack_id for m in r.received_messages]})


def wait_for(pred, timeout: float = 10.0, every: float = 0.1):
    """Poll ``pred`` until it returns something truthy (returned) or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    return pred()
