"""What goes into an instance's ``broker_files`` bucket: the schema map, the templates and the
VM start-up scripts that components fetch fresh at start. Pure: returns path → bytes."""

from __future__ import annotations

from pathlib import Path

from pgbctl.paths import SCHEMA_MAPS_DIR, TEMPLATES_DIR, VM_STARTUP_DIR


def _tree(root: Path, prefix: str) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                out[f"{prefix}/{p.relative_to(root).as_posix()}"] = p.read_bytes()
    return out


def collect(survey: str) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    smap = SCHEMA_MAPS_DIR / f"{survey}.yaml"
    if not smap.is_file():
        raise FileNotFoundError(f"no schema map for survey {survey!r} ({smap})")
    files[f"schema_maps/{survey}.yaml"] = smap.read_bytes()
    for sub in (survey, "common"):
        files.update(_tree(TEMPLATES_DIR / "bigquery" / sub, f"templates/bigquery/{sub}"))
    files.update(_tree(VM_STARTUP_DIR, "vm_startup"))
    return files
