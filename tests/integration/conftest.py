"""Session fixture: the local services (Pub/Sub emulator, fake-gcs-server, bqemulator) in a
temporary state directory, started once per test session and stopped at the end.

``PGBCTL_HOME`` points at that directory while the session runs, so code calling
``pgbctl.local.endpoints()`` with no arguments finds the services.  Teardown fails loudly if
any process of the services or of supervised processes survives ``down()``.
"""

from __future__ import annotations

import os
import time

import pytest

from pgbctl.local import services as svc
from pgbctl.local.procs import pid_alive


@pytest.fixture(scope="session")
def local_home(tmp_path_factory):
    return tmp_path_factory.mktemp("pgbctl-home")


@pytest.fixture(scope="session")
def local_services(local_home):
    """``(home, Endpoints)`` for running, healthy local services."""
    old = os.environ.get("PGBCTL_HOME")
    os.environ["PGBCTL_HOME"] = str(local_home)
    t0 = time.monotonic()
    try:
        svc.up(home=local_home, timeout=60)
    except Exception:
        svc.down(home=local_home)
        raise
    print(f"\n[local services up in {time.monotonic() - t0:.1f}s at {local_home}]")
    try:
        yield local_home, svc.endpoints(local_home)
    finally:
        pids = svc.all_pids(local_home)
        svc.down(home=local_home)
        if old is None:
            os.environ.pop("PGBCTL_HOME", None)
        else:
            os.environ["PGBCTL_HOME"] = old
        survivors = [p for p in pids if pid_alive(p)]
        assert not survivors, f"processes survived down(): {survivors}"


@pytest.fixture(scope="session")
def local_endpoints(local_services):
    return local_services[1]


@pytest.fixture()
def local_clients(local_endpoints):
    from pgbctl.clients import Clients

    c = Clients.for_backend("local", local_endpoints.project, local_endpoints)
    yield c
    c.close()
