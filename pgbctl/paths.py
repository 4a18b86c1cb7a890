"""Where things live on disk. Pure path arithmetic plus two environment overrides."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
TEMPLATES_DIR = REPO_ROOT / "templates"
FUNCTIONS_DIR = REPO_ROOT / "functions"
BEAM_JOBS_DIR = REPO_ROOT / "beam_jobs"
VM_STARTUP_DIR = REPO_ROOT / "vm_startup"
SCHEMA_MAPS_DIR = PACKAGE_DIR / "schema_maps"


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the repository (or ``$PGBCTL_SHARED_DATA``), if present."""
    env = os.environ.get("PGBCTL_SHARED_DATA")
    p = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return p if p.is_dir() else None


def state_dir() -> Path:
    """Local-backend state (emulator data, logs, pids): ``$PGBCTL_HOME`` or ``<repo>/.pgbctl``."""
    env = os.environ.get("PGBCTL_HOME")
    p = Path(env) if env else REPO_ROOT / ".pgbctl"
    p.mkdir(parents=True, exist_ok=True)
    return p
