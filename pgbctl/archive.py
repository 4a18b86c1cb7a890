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
    fixed, rec, schema = codec.fix_and_decode(data, smap)
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
    except Exception as e:  # noqa: BLE001 - prepare is pure: whatever it raises is about the input
        if isinstance(e, codec.AlertDecodeError):
            reason = str(e) or type(e).__name__
        else:
            reason = f"cannot archive the packet: {type(e).__name__}: {e}"
        reason = " ".join(reason.split())[:1000]
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
    name = dead_letter_name(stage, data, message_id)
    meta = {"reason": reason[:1000], "stage": stage, "pubsub.message_id": message_id,
            **{f"attr.{k}": str(v)[:200] for k, v in attributes.items()}}
    rec = dead_letter_record(stage, reason, attributes, message_id, f"{bucket}/{name}")
    pending = store_dead_letter(storage.bucket(bucket), name, data, "application/octet-stream", meta,
                                publisher=publisher, topic=topic, record=rec)
    finish_dead_letters([pending] if pending else [])
    log.warning("dead letter %s: %s", name, reason)
    return Outcome("dead_letter", name, reason)


#: metadata key set on a dead-letter object once its record was published on the topic
ANNOUNCED = "announced"


def store_dead_letter(bucket, name: str, payload: bytes, content_type: str, metadata: dict[str, str], *,
                      publisher=None, topic: str | None = None, record: dict | None = None):
    """Store one dead letter and start announcing it; returns what
    :func:`finish_dead_letters` must complete, or None when there is nothing left to do.

    Idempotent and loss-free across redeliveries: the object is written with
    ``if_generation_match=0`` and marked ``announced=true`` only after its record was
    published, so a redelivery finds an existing object and publishes again only if the
    first attempt died between the upload and the publish (at-least-once on the topic,
    exactly once in the bucket).
    """
    from google.api_core import exceptions as gexc

    blob = bucket.blob(name)
    blob.metadata = {**metadata, ANNOUNCED: "false" if (publisher is not None and topic) else "true"}
    try:
        blob.upload_from_string(payload, content_type=content_type, if_generation_match=0)
    except gexc.PreconditionFailed:
        blob = bucket.get_blob(name)
        if blob is None or (blob.metadata or {}).get(ANNOUNCED) != "false":
            return None  # a redelivery of a dead letter already kept and announced
    if publisher is None or not topic:
        return None
    rec = record or {}
    future = publisher.publish(topic, json.dumps(rec, default=str).encode(), stage=str(rec.get("stage", "")),
                               reason=str(rec.get("reason", ""))[:500])
    return blob, future


def finish_dead_letters(pending: list, timeout: float = 60) -> None:
    """Wait for the publishes started by :func:`store_dead_letter` and mark the objects
    announced. Raises if a publish failed (the message is then redelivered and retried)."""
    for blob, future in pending:
        future.result(timeout=timeout)
    for blob, _ in pending:
        blob.metadata = {**(blob.metadata or {}), ANNOUNCED: "true"}
        blob.patch()
