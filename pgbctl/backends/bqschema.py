"""BigQuery table schemas: load the JSON templates and compare schemas canonically."""

from __future__ import annotations

import json
from pathlib import Path

from pgbctl import naming
from pgbctl.paths import TEMPLATES_DIR

_TYPE_ALIASES = {
    "INT64": "INTEGER",
    "FLOAT64": "FLOAT",
    "BOOL": "BOOLEAN",
    "STRUCT": "RECORD",
}


def template_path(survey: str, table: str) -> Path:
    return TEMPLATES_DIR / "bigquery" / survey / f"{table}.json"


def load_template(survey: str, table: str) -> list[dict]:
    path = template_path(survey, table)
    if not path.is_file():
        raise FileNotFoundError(f"no BigQuery schema template for survey {survey!r} table {table!r}: {path}")
    return json.loads(path.read_text())


def _canon_field(f: dict) -> dict:
    out = {
        "name": f["name"],
        "type": _TYPE_ALIASES.get(f.get("type", "STRING").upper(), f.get("type", "STRING").upper()),
        "mode": (f.get("mode") or "NULLABLE").upper(),
    }
    sub = f.get("fields")
    if sub:
        out["fields"] = [_canon_field(s) for s in sub]
    return out


def canonical(schema: list[dict]) -> str:
    """A canonical JSON text of a schema: names, types (aliases folded), modes, nesting."""
    return json.dumps([_canon_field(f) for f in schema], sort_keys=True, separators=(",", ":"))


def table_schemas(survey: str) -> dict[str, str]:
    """Table stub → canonical schema text, for every table of an instance."""
    return {t: canonical(load_template(survey, t)) for t in naming.TABLES}
