"""The README's main job (`make demo` = `python -m pgbctl.demo`) runs a night that reconciles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pgbctl import paths

pytestmark = pytest.mark.integration


def test_demo_night_reconciles(local_services):
    home, _ = local_services
    env = {**os.environ, "PGBCTL_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "pgbctl.demo", "--testid", "demotest", "--synthetic", "40",
                        "--rate", "max"], env=env, capture_output=True, text=True, timeout=600,
                       cwd=paths.REPO_ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "alerts per stage" in r.stdout
    st = subprocess.run([sys.executable, "-m", "pgbctl", "status", "--testid", "demotest", "--json"], env=env,
                        capture_output=True, text=True, timeout=300)
    rec = json.loads(st.stdout)["reconcile"]
    n = rec["alerts published (alerts-counter)"]
    assert n >= 40
    assert rec["objects in alert_avros bucket"] == rec["rows in DIASource table"]
    # every alert is archived or dead-lettered; nothing vanishes
    assert rec["objects in alert_avros bucket"] + rec["dead letters"] >= n
    subprocess.run([sys.executable, "-m", "pgbctl", "delete", "--testid", "demotest", "--yes"], env=env,
                   capture_output=True, timeout=300)
