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


def clean(v: Any) -> Any:
    """NaN/inf → None, bytes → base64 text, recursively."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return base64.b64encode(bytes(v)).decode()
    return v


def alerts_row(alert: dict, smap: SchemaMap) -> dict:
    return clean(codec.strip_cutouts(alert, smap))


def prv_ids_column(smap: SchemaMap) -> str:
    return f"prv_{smap['sourceId']}s"


def diasource_row(alert: dict, smap: SchemaMap) -> dict:
    """The current detection as one flat row."""
    object_id, source_id = codec.alert_ids(alert, smap)
    if object_id in (None, "") or source_id is None:
        raise RowError(f"alert has no {smap['objectId']!r} or source {smap['sourceId']!r}")
    stripped = codec.strip_cutouts(alert, smap)
    src = dict(codec.source_record(stripped, smap))
    row = {
        "objectId": str(object_id),
        "schemavsn": codec.schema_version(alert, smap),
        "publisher": alert.get("publisher"),
    }
    row.update(src)
    prv_ids = [p.get(smap["sourceId"]) for p in codec.prv_records(stripped, smap)]
    row[prv_ids_column(smap)] = [int(i) for i in prv_ids if i is not None]
    return clean(row)


def source_id(alert: dict, smap: SchemaMap) -> int | None:
    return codec.alert_ids(alert, smap)[1]
