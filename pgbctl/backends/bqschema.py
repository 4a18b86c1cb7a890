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
    """``templates/bigquery/<survey>/<table>.json``, else the survey-independent ``common/``."""
    own = TEMPLATES_DIR / "bigquery" / survey / f"{table}.json"
    return own if own.is_file() else TEMPLATES_DIR / "bigquery" / "common" / f"{table}.json"


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


# ---- Avro → BigQuery ------------------------------------------------------------------------

_AVRO_TO_BQ = {
    "string": "STRING",
    "bytes": "BYTES",
    "int": "INTEGER",
    "long": "INTEGER",
    "float": "FLOAT",
    "double": "FLOAT",
    "boolean": "BOOLEAN",
}


def avro_to_bq(avro_record: dict, drop: frozenset[str] = frozenset(), named: dict | None = None) -> list[dict]:
    """BigQuery schema (API repr) for a parsed Avro record schema; fields in ``drop`` are left out.

    Nullable unions become NULLABLE, arrays REPEATED, records RECORD (nested).
    """
    named = {} if named is None else named
    out = []
    for f in avro_record["fields"]:
        if f["name"] in drop:
            continue
        out.append(_avro_field(f["name"], f["type"], f.get("doc"), drop, named))
    return out


def _avro_field(name, t, doc, drop, named) -> dict:
    mode = "REQUIRED"
    if isinstance(t, list):
        branches = [b for b in t if b != "null"]
        if len(branches) != 1:
            raise ValueError(f"field {name}: unions of several non-null types are not supported")
        mode, t = "NULLABLE", branches[0]
    if isinstance(t, str) and t in named:
        t = named[t]
    if isinstance(t, dict) and t.get("type") == "array":
        inner = _avro_field(name, t["items"], doc, drop, named)
        inner["mode"] = "REPEATED"
        return inner
    out: dict = {"name": name, "mode": mode}
    if isinstance(t, dict) and t.get("type") == "record":
        full = t["name"] if "." in t["name"] else f"{t.get('namespace', '')}.{t['name']}".lstrip(".")
        named[full] = t
        named[t["name"]] = t
        out["type"] = "RECORD"
        out["fields"] = avro_to_bq(t, drop, named)
    elif isinstance(t, dict):
        out["type"] = _AVRO_TO_BQ[t["type"]]
    else:
        out["type"] = _AVRO_TO_BQ[t]
    if doc:
        out["description"] = doc[:1024]
    return out
