"""Warehouse rows from decoded alerts. Pure functions, survey-agnostic through the schema map.

* ``alerts`` table: the alert without cutouts (nested source record, repeated previous sources).
* ``DIASource`` table: one flat row per alert's current detection: the source fields plus
  ``objectId``, ``schemavsn``, ``publisher`` and the ids of the previous detections.

Values are made JSON- and BigQuery-safe: NaN/±inf become null (BigQuery's JSON API cannot carry
them), bytes become base64 text.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from pgbctl import codec
from pgbctl.schemamap import SchemaMap


class RowError(ValueError):
    """An alert cannot be turned into a row (the message says why, in one line)."""


_PLAIN = (str, int, bool, type(None))


def clean(v: Any) -> Any:
    """NaN/inf → None, bytes → base64 text, recursively (new containers; the input is untouched).

    Hot path of the warehouse sinks (~1,000 values per ZTF alert): leaves are handled inline
    by exact type, anything unusual (float/int subclasses, tuples, ...) by the general case.
    """
    t = type(v)
    if t is dict:
        return _clean_dict(v)
    if t is list or t is tuple:
        return _clean_list(v)
    if t is float:
        return v if math.isfinite(v) else None
    return _clean_other(v)


def _clean_other(v: Any) -> Any:
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, dict):
        return _clean_dict(v)
    if isinstance(v, (list, tuple)):
        return _clean_list(v)
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode()
    return v


def _clean_dict(d: dict) -> dict:
    out = {}
    isfinite = math.isfinite
    for k, x in d.items():
        t = type(x)
        if t is float:
            out[k] = x if isfinite(x) else None
        elif t in _PLAIN:
            out[k] = x
        elif t is dict:
            out[k] = _clean_dict(x)
        elif t is list:
            out[k] = _clean_list(x)
        else:
            out[k] = _clean_other(x)
    return out


def _clean_list(v) -> list:
    return [x if type(x) in _PLAIN else clean(x) for x in v]


def _drop(rec: dict, names) -> dict:
    return {k: v for k, v in rec.items() if k not in names}


def alerts_row(alert: dict, smap: SchemaMap) -> dict:
    """The alert without cutouts, cleaned (a new tree; ``alert`` is untouched)."""
    cut = smap["cutouts"]
    if cut["location"] == "alert":  # top-level cutouts: no need to copy the tree twice
        return clean(_drop(alert, set(cut["fields"])))
    return clean(codec.strip_cutouts(alert, smap))


def prv_ids_column(smap: SchemaMap) -> str:
    return f"prv_{smap['sourceId']}s"


def diasource_row(alert: dict, smap: SchemaMap) -> dict:
    """The current detection as one flat row."""
    object_id, source_id = codec.alert_ids(alert, smap)
    if object_id in (None, "") or source_id is None:
        raise RowError(f"alert has no {smap['objectId']!r} or source {smap['sourceId']!r}")
    cut = smap["cutouts"]
    src = codec.source_record(alert, smap)
    if cut["location"] == "source":
        src = _drop(src, set(cut["fields"]))
    row = {
        "objectId": str(object_id),
        "schemavsn": codec.schema_version(alert, smap),
        "publisher": alert.get("publisher"),
    }
    row.update(src)
    prv_ids = [p.get(smap["sourceId"]) for p in codec.prv_records(alert, smap)]
    row[prv_ids_column(smap)] = [int(i) for i in prv_ids if i is not None]
    return clean(row)


def source_id(alert: dict, smap: SchemaMap) -> int | None:
    return codec.alert_ids(alert, smap)[1]
