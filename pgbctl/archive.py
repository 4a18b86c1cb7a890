"""Avro archive: one alert message → one object ``<objectId>.<sourceId>.<kafka topic>.avro``.

:func:`prepare` is pure (bytes + attributes in, object name + fixed bytes + metadata out, or an
:class:`~pgbctl.codec.AlertDecodeError`). :func:`handle` adds the I/O: an idempotent upload
(``if_generation_match=0``: a redelivered message finds the object and changes nothing) and,
for bad input, a dead-letter record (the raw bytes in the ``dead_letter`` bucket with the
reason in its metadata, and a message on the ``dead_letter`` topic) so nothing is dropped
silently and later alerts are never blocked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field

from pgbctl import codec
from pgbctl.schemamap import SchemaMap

log = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9_.\-]")


@dataclass(frozen=True)
class Prepared:
    name: str
    data: bytes
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What :func:`handle` did: ``stored`` (new object), ``exists`` (redelivery: nothing
    changed) or ``dead_letter`` (with ``reason``)."""

    status: str
    name: str
    reason: str = ""


def object_name(object_id, source_id, kafka_topic: str) -> str:
    parts = [str(object_id), str(source_id), kafka_topic or "unknown"]
    return ".".join(_SAFE.sub("_", p) for p in parts) + ".avro"


def _meta_value(v) -> str | None:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return None
    return str(v)


def prepare(data: bytes, attributes: dict[str, str], smap: SchemaMap, message_id: str = "") -> Prepared:
    """Decode (exactly one record), fix the schema header, and name the object.

    Raises :class:`codec.AlertDecodeError` (one line) for anything that must be dead-lettered:
    not Avro, not one record, no object/source id.
    """
    fixed = codec.fix_schema_header(data, smap)
    rec, schema = codec.decode_with_schema(fixed)
    object_id, source_id = codec.alert_ids(rec, smap)
    if object_id in (None, "") or source_id is None:
        raise codec.AlertDecodeError(
            f"alert has no {smap['objectId']!r}/{smap['sourceId']!r}: cannot name its archive object"
        )
    src = codec.source_record(rec, smap)
    topic = attributes.get("kafka.topic", "")
    meta = {
        "objectId": str(object_id),
        "candid": str(source_id),
        "ra": _meta_value(src.get(smap["ra"])),
        "dec": _meta_value(src.get(smap["dec"])),
        "kafka.topic": topic,
        "schemavsn": codec.schema_version(rec, smap, schema),
        "pubsub.message_id": message_id,
    }
    return Prepared(object_name(object_id, source_id, topic), fixed,
                    {k: v for k, v in meta.items() if v is not None})


def dead_letter_name(stage: str, data: bytes, message_id: str = "") -> str:
    key = message_id or hashlib.sha256(data).hexdigest()[:32]
    return f"{stage}/{_SAFE.sub('_', key)}.avro"


def dead_letter_record(stage: str, reason: str, attributes: dict[str, str], message_id: str, name: str) -> dict:
    return {
        "stage": stage,
        "reason": reason,
        "message_id": message_id,
        "object": name,
        "attributes": dict(attributes),
    }


def handle(
    data: bytes,
    attributes: dict[str, str],
    message_id: str,
    *,
    smap: SchemaMap,
    storage,
    bucket: str,
    dead_letter_bucket: str,
    publisher=None,
    dead_letter_topic: str | None = None,
) -> Outcome:
    """Archive one message. Never raises for bad input (dead-letters it); storage errors do
    raise so the message is redelivered."""
    from google.api_core import exceptions as gexc

    try:
        p = prepare(data, attributes, smap, message_id)
    except codec.AlertDecodeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return _dead_letter("upload_bytes_to_bucket", reason, data, attributes, message_id,
                            storage=storage, bucket=dead_letter_bucket,
                            publisher=publisher, topic=dead_letter_topic)
    blob = storage.bucket(bucket).blob(p.name)
    blob.metadata = p.metadata
    try:
        blob.upload_from_string(p.data, content_type="application/avro-binary", if_generation_match=0)
    except gexc.PreconditionFailed:
        return Outcome("exists", p.name)
    return Outcome("stored", p.name)


def _dead_letter(stage, reason, data, attributes, message_id, *, storage, bucket, publisher, topic) -> Outcome:
    from google.api_core import exceptions as gexc

    name = dead_letter_name(stage, data, message_id)
    blob = storage.bucket(bucket).blob(name)
    blob.metadata = {"reason": reason[:1000], "stage": stage, "pubsub.message_id": message_id,
                     **{f"attr.{k}": str(v)[:200] for k, v in attributes.items()}}
    try:
        blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=0)
    except gexc.PreconditionFailed:
        return Outcome("dead_letter", name, reason)  # redelivery of a dead letter: already kept
    if publisher is not None and topic:
        rec = dead_letter_record(stage, reason, attributes, message_id, f"{bucket}/{name}")
        publisher.publish(topic, json.dumps(rec).encode(), stage=stage, reason=reason[:500]).result(timeout=60)
    log.warning("dead letter %s: %s", name, reason)
    return Outcome("dead_letter", name, reason)
