"""Alert codec: Avro single-record containers in, plain dicts and light curves out.

Survey-agnostic: every survey-specific name comes from a :class:`pgbctl.schemamap.SchemaMap`.

Container handling is done here (header, blocks, sync markers) so that errors are precise and
one line long (they end up in dead-letter records), and so that a header can be rewritten
without touching the data blocks when that is possible (:func:`fix_schema_header`).
Record bodies are decoded and encoded by fastavro's schemaless reader/writer with the writer
schema parsed once per distinct header (cached).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import fastavro
import numpy as np

from pgbctl.schemamap import SchemaMap

__all__ = [
    "AlertDecodeError",
    "MAGIC",
    "LN10_OVER_2P5",
    "decode",
    "decode_with_schema",
    "header_schema",
    "header_metadata",
    "encode",
    "schema_version",
    "get_path",
    "source_record",
    "prv_records",
    "alert_ids",
    "strip_cutouts",
    "fix_schema_header",
    "fix_and_decode",
    "fix_schema",
    "strict_schema_problems",
    "schema_fullname",
    "mag_to_flux",
    "flux_to_mag",
    "LightCurve",
    "light_curve",
]

MAGIC = b"Obj\x01"
SYNC_SIZE = 16
#: d(flux)/flux = (ln 10 / 2.5) d(mag). The system we re-create used ln(10/2.5) = 1.386 instead
#: of ln(10)/2.5 = 0.921, overstating flux errors by 50 %.
LN10_OVER_2P5 = math.log(10.0) / 2.5
AVRO_SCHEMAS_DIR = Path(__file__).resolve().parent / "avro_schemas"


class AlertDecodeError(ValueError):
    """A packet is not a valid single-record Avro container. ``str(e)`` is one line."""

    def __init__(self, msg: str) -> None:
        super().__init__(" ".join(str(msg).split()))


# =============================================================================================
# container layer
# =============================================================================================


def _read_long(buf: bytes | memoryview, pos: int, what: str) -> tuple[int, int]:
    """Zig-zag varint at ``pos`` → (value, new pos)."""
    shift = 0
    acc = 0
    n = len(buf)
    while True:
        if pos >= n:
            raise AlertDecodeError(f"truncated {what}: varint runs past end of data")
        b = buf[pos]
        pos += 1
        acc |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
        if shift > 63:
            raise AlertDecodeError(f"corrupt {what}: varint longer than 10 bytes")
    return (acc >> 1) ^ -(acc & 1), pos


def _write_long(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass(frozen=True)
class _Container:
    meta: dict[str, bytes]  # insertion-ordered, as in the header
    sync: bytes
    header_end: int  # offset of the first data block
    blocks: tuple[tuple[int, int, int], ...]  # (record count, data start, data end)

    @property
    def n_records(self) -> int:
        return sum(c for c, _, _ in self.blocks)

    @property
    def codec(self) -> str:
        return self.meta.get("avro.codec", b"null").decode("ascii", "replace") or "null"

    @property
    def schema_text(self) -> str:
        return self.meta["avro.schema"].decode("utf-8")


def _parse_container(data: bytes) -> _Container:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise AlertDecodeError(f"not an Avro container: expected bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise AlertDecodeError("not an Avro container: empty payload")
    if bytes(data[:4]) != MAGIC:
        raise AlertDecodeError(f"not an Avro container: bad magic {bytes(data[:4])!r} (expected {MAGIC!r})")
    pos = 4
    meta: dict[str, bytes] = {}
    while True:
        count, pos = _read_long(data, pos, "Avro header")
        if count == 0:
            break
        if count < 0:
            count = -count
            _, pos = _read_long(data, pos, "Avro header")
        for _ in range(count):
            klen, pos = _read_long(data, pos, "Avro header")
            if klen < 0 or pos + klen > len(data):
                raise AlertDecodeError("truncated Avro header: metadata key runs past end of data")
            key = bytes(data[pos : pos + klen]).decode("utf-8", "replace")
            pos += klen
            vlen, pos = _read_long(data, pos, "Avro header")
            if vlen < 0 or pos + vlen > len(data):
                raise AlertDecodeError(f"truncated Avro header: metadata value {key!r} runs past end of data")
            meta[key] = bytes(data[pos : pos + vlen])
            pos += vlen
    if pos + SYNC_SIZE > len(data):
        raise AlertDecodeError("truncated Avro header: no sync marker")
    sync = bytes(data[pos : pos + SYNC_SIZE])
    pos += SYNC_SIZE
    header_end = pos
    if "avro.schema" not in meta:
        raise AlertDecodeError("invalid Avro header: no avro.schema entry")
    blocks = []
    n = len(data)
    while pos < n:
        i = len(blocks)
        count, pos = _read_long(data, pos, f"Avro block {i}")
        size, pos = _read_long(data, pos, f"Avro block {i}")
        if count < 0 or size < 0:
            raise AlertDecodeError(f"truncated/corrupt Avro block: block {i} has negative count or size")
        if pos + size + SYNC_SIZE > n:
            raise AlertDecodeError(
                f"truncated/corrupt Avro block: block {i} declares {size} bytes + sync but "
                f"{n - pos} bytes remain"
            )
        blocks.append((count, pos, pos + size))
        pos += size
        if bytes(data[pos : pos + SYNC_SIZE]) != sync:
            raise AlertDecodeError(f"truncated/corrupt Avro block: sync marker mismatch after block {i}")
        pos += SYNC_SIZE
    return _Container(meta, sync, header_end, tuple(blocks))


def _decompress(codec: str, raw: bytes) -> bytes:
    if codec == "null":
        return raw
    if codec == "deflate":
        try:
            return zlib.decompress(raw, -15)
        except zlib.error as e:
            raise AlertDecodeError(f"truncated/corrupt Avro block: deflate: {e}") from e
    raise AlertDecodeError(f"unsupported Avro codec {codec!r} (supported: null, deflate)")


def _compress(codec: str, raw: bytes) -> bytes:
    if codec == "null":
        return raw
    if codec == "deflate":
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        return c.compress(raw) + c.flush()
    raise ValueError(f"unsupported Avro codec {codec!r} (supported: null, deflate)")


@functools.lru_cache(maxsize=64)
def _parsed(schema_text: str):
    """fastavro-parsed schema for a header's schema text (cached: parsing ZTF's costs ~ms)."""
    try:
        schema = json.loads(schema_text)
    except ValueError as e:
        raise AlertDecodeError(f"invalid writer schema in Avro header: not JSON: {e}") from e
    try:
        # lenient on defaults, as every Avro reader is when *reading* (ZTF's original header
        # has defaults that do not match the first union branch)
        return fastavro.parse_schema(schema, _ignore_default_error=True)
    except TypeError:  # very old fastavro without the keyword
        return fastavro.parse_schema(schema)
    except Exception as e:
        raise AlertDecodeError(f"invalid writer schema in Avro header: {type(e).__name__}: {e}") from e


def _decode_block(parsed, body: bytes, count: int, block_index: int) -> list:
    bio = io.BytesIO(body)
    out = []
    try:
        for _ in range(count):
            out.append(fastavro.schemaless_reader(bio, parsed, None))
    except Exception as e:  # EOFError, struct.error, UnicodeDecodeError, IndexError...
        raise AlertDecodeError(
            f"truncated/corrupt Avro block: block {block_index}: {type(e).__name__}: {e}"
        ) from e
    left = len(body) - bio.tell()
    if left:
        raise AlertDecodeError(
            f"truncated/corrupt Avro block: block {block_index} has {left} bytes after its "
            f"{count} record(s)"
        )
    return out


def _decode_one(data: bytes) -> tuple[dict, str]:
    c = _parse_container(data)
    n = c.n_records
    if n != 1:
        raise AlertDecodeError(f"Avro container holds {n} records, expected exactly 1")
    parsed = _parsed(c.schema_text)
    codec = c.codec
    rec = None
    for i, (count, start, end) in enumerate(c.blocks):
        if count:
            body = _decompress(codec, bytes(data[start:end]))
            rec = _decode_block(parsed, body, count, i)[0]
            break
    if not isinstance(rec, dict):
        raise AlertDecodeError(f"Avro container record is a {type(rec).__name__}, expected a record")
    return rec, c.schema_text


def decode_with_schema(data: bytes) -> tuple[dict, dict]:
    """``(record, writer_schema)`` of a single-record Avro container.

    ``writer_schema`` is the JSON of the header exactly as written (so it keeps ``doc``).
    Raises :class:`AlertDecodeError` unless the container holds exactly one record.
    """
    rec, text = _decode_one(data)
    return rec, json.loads(text)


def decode(data: bytes) -> dict:
    """The one record of a single-record Avro container (see :func:`decode_with_schema`)."""
    return _decode_one(data)[0]


def header_metadata(data: bytes) -> dict[str, bytes]:
    """The container's header metadata (``avro.schema``, ``avro.codec``, ...) without decoding."""
    return dict(_parse_container(data).meta)


def header_schema(data: bytes) -> dict:
    """The writer schema JSON of a container, without decoding the records."""
    try:
        return json.loads(_parse_container(data).schema_text)
    except ValueError as e:
        if isinstance(e, AlertDecodeError):
            raise
        raise AlertDecodeError(f"invalid writer schema in Avro header: not JSON: {e}") from e


def _container_bytes(schema_text: str, blocks: Iterable[tuple[int, bytes]], sync: bytes,
                     meta: dict[str, bytes] | None = None, codec: str = "null") -> bytes:
    meta = dict(meta or {})
    meta["avro.schema"] = schema_text.encode("utf-8")
    meta.setdefault("avro.codec", codec.encode("ascii"))
    out = bytearray(MAGIC)
    out += _write_long(len(meta))
    for k, v in meta.items():
        kb = k.encode("utf-8")
        out += _write_long(len(kb)) + kb + _write_long(len(v)) + v
    out += _write_long(0)
    out += sync
    for count, body in blocks:
        out += _write_long(count) + _write_long(len(body)) + body + sync
    return bytes(out)


def encode(records: dict | list[dict], schema: dict | str, *, sync: bytes | None = None,
           codec: str = "null", metadata: dict[str, bytes] | None = None) -> bytes:
    """An Avro container of ``records`` (one block) with ``schema`` written verbatim in the header.

    Unlike ``fastavro.writer`` the header text is exactly ``schema`` (keeps top-level ``doc``),
    and ``sync`` may be fixed for byte-reproducible output.
    """
    if isinstance(records, dict):
        records = [records]
    text = schema if isinstance(schema, str) else json.dumps(schema)
    parsed = _parsed(text)
    buf = io.BytesIO()
    for r in records:
        fastavro.schemaless_writer(buf, parsed, r)
    if sync is None:
        sync = os.urandom(SYNC_SIZE)
    if len(sync) != SYNC_SIZE:
        raise ValueError("sync marker must be 16 bytes")
    meta = dict(metadata or {})
    meta.pop("avro.schema", None)
    meta["avro.codec"] = codec.encode("ascii")
    return _container_bytes(text, [(len(records), _compress(codec, buf.getvalue()))], sync, meta)


# =============================================================================================
# record access through the schema map
# =============================================================================================


def get_path(record: Any, path: str | list[str] | None, default: Any = None) -> Any:
    """``record["a"]["b"]`` for path ``"a.b"``; ``default`` if any step is missing or null.

    A list of paths means alternatives: the first that resolves to a non-null value wins.
    """
    if path is None:
        return default
    if isinstance(path, (list, tuple)):
        for p in path:
            v = get_path(record, p)
            if v is not None:
                return v
        return default
    cur = record
    for part in path.split("."):
        if not isinstance(cur, dict) or cur.get(part) is None:
            return default
        cur = cur[part]
    return cur


def source_record(alert: dict, smap: SchemaMap) -> dict:
    """The source (detection) that triggered the alert, ``{}`` if absent."""
    src = get_path(alert, smap["source"], {})
    return src if isinstance(src, dict) else {}


def prv_records(alert: dict, smap: SchemaMap) -> list[dict]:
    """The previous sources (detections and, where the survey sends them, upper limits)."""
    return [r for r in (get_path(alert, smap["prvSources"], []) or []) if isinstance(r, dict)]


def alert_ids(alert: dict, smap: SchemaMap) -> tuple[Any, Any]:
    """``(objectId, sourceId)`` of an alert (sourceId of the triggering source)."""
    return get_path(alert, smap["objectId"]), source_record(alert, smap).get(smap["sourceId"])


def schema_version(record: dict, smap: SchemaMap, writer_schema: dict | None = None) -> str | None:
    """The alert's schema version: its version field if the map has one, else the writer
    schema's ``version`` attribute, else ``SCHEMA_VERSION_REGEX`` on the schema's full name."""
    field = smap.get("schemavsn")
    if field:
        v = get_path(record, field)
        if v is not None:
            return str(v)
    if writer_schema:
        if writer_schema.get("version") is not None:
            return str(writer_schema["version"])
        rx = smap.get("SCHEMA_VERSION_REGEX")
        if rx:
            m = re.search(rx, schema_fullname(writer_schema))
            if m:
                return ".".join(m.groups()) if m.groups() else m.group(0)
    return None


def _stripped(rec: dict, names: list[str], mode: str) -> dict:
    out = dict(rec)
    for n in names:
        if n in out:
            if mode == "drop":
                del out[n]
            else:
                out[n] = None
    return out


def _copy_tree(x: Any) -> Any:
    # deep copy of dicts/lists only; leaves (bytes, str, numbers) are immutable and shared
    if isinstance(x, dict):
        return {k: _copy_tree(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy_tree(v) for v in x]
    return x


def strip_cutouts(alert: dict, smap: SchemaMap, *, mode: str = "drop") -> dict:
    """A new alert dict without image cutouts; ``alert`` is left untouched.

    ``mode="drop"`` removes the cutout fields (for tables without cutout columns);
    ``mode="null"`` sets them to ``None`` (the record stays valid for the writer schema when
    the cutout fields are nullable). Where the cutouts live (top level, or inside each source
    record) comes from the map's ``cutouts.location``.
    """
    if mode not in ("drop", "null"):
        raise ValueError(f"mode must be 'drop' or 'null', got {mode!r}")
    cut = smap["cutouts"]
    names = list(cut["fields"])
    out = _copy_tree(alert)
    if cut["location"] == "alert":
        return _stripped(out, names, mode)
    # location: source -> inside the source record and every prvSources entry
    for key in ("source", "prvSources"):
        path = smap.get(key)
        if not path:
            continue
        parts = path.split(".")
        parent = get_path(out, ".".join(parts[:-1])) if len(parts) > 1 else out
        if not isinstance(parent, dict) or parent.get(parts[-1]) is None:
            continue
        val = parent[parts[-1]]
        if isinstance(val, list):
            parent[parts[-1]] = [_stripped(r, names, mode) if isinstance(r, dict) else r for r in val]
        elif isinstance(val, dict):
            parent[parts[-1]] = _stripped(val, names, mode)
    return out


# =============================================================================================
# schema header fix
# =============================================================================================


def schema_fullname(schema: dict) -> str:
    name = schema.get("name", "")
    if "." in name or not schema.get("namespace"):
        return name
    return f"{schema['namespace']}.{name}"


_PRIMS = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def _default_matches(t: Any, value: Any, named: dict[str, Any]) -> bool:
    """Does ``value`` fit Avro type ``t`` as a field default? (Avro spec, as Java enforces.)"""
    if isinstance(t, list):  # union: the default belongs to the FIRST branch
        return bool(t) and _default_matches(t[0], value, named)
    if isinstance(t, str):
        if t in _PRIMS:
            return {
                "null": value is None,
                "boolean": isinstance(value, bool),
                "int": isinstance(value, int) and not isinstance(value, bool),
                "long": isinstance(value, int) and not isinstance(value, bool),
                "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                "double": isinstance(value, (int, float)) and not isinstance(value, bool),
                "bytes": isinstance(value, str),
                "string": isinstance(value, str),
            }[t]
        return t in named and _default_matches(named[t], value, named)
    if isinstance(t, dict):
        kind = t.get("type")
        if kind == "array":
            return isinstance(value, list)
        if kind == "map":
            return isinstance(value, dict)
        if kind == "enum":
            return value in t.get("symbols", [])
        if kind == "fixed":
            return isinstance(value, str)
        if kind == "record":
            return isinstance(value, dict)
        return _default_matches(kind, value, named)
    return False


def _walk_named(t: Any, ns: str | None, named: dict[str, Any]) -> None:
    """Register every named type (by full and short name)."""
    if isinstance(t, list):
        for b in t:
            _walk_named(b, ns, named)
    elif isinstance(t, dict):
        kind = t.get("type")
        if kind in ("record", "error", "enum", "fixed"):
            name = t.get("name", "")
            space = t.get("namespace", ns)
            full = name if "." in name else (f"{space}.{name}" if space else name)
            named[full] = t
            named.setdefault(name.rsplit(".", 1)[-1], t)
            inner_ns = full.rsplit(".", 1)[0] if "." in full else None
            for f in t.get("fields", []) or []:
                _walk_named(f.get("type"), inner_ns, named)
        elif kind == "array":
            _walk_named(t.get("items"), ns, named)
        elif kind == "map":
            _walk_named(t.get("values"), ns, named)


def strict_schema_problems(schema: dict) -> list[str]:
    """Field defaults that a strict Avro parser (Java ``Schema.Parser``, BigQuery) rejects.

    The Avro spec says a union field's default must match the union's FIRST branch; fastavro
    and the ``avro`` Python package do not check this, Java does. Empty list = strictly valid.
    """
    named: dict[str, Any] = {}
    _walk_named(schema, None, named)
    probs: list[str] = []

    def visit(t: Any, path: str, seen: set[int]) -> None:
        if isinstance(t, list):
            for b in t:
                visit(b, path, seen)
        elif isinstance(t, dict):
            if id(t) in seen:
                return
            seen.add(id(t))
            kind = t.get("type")
            if kind in ("record", "error"):
                for f in t.get("fields", []) or []:
                    p = f"{path}.{f.get('name')}" if path else str(f.get("name"))
                    if "default" in f and not _default_matches(f.get("type"), f["default"], named):
                        probs.append(f"{p}: default {f['default']!r} does not match type {json.dumps(f.get('type'))}")
                    visit(f.get("type"), p, seen)
            elif kind == "array":
                visit(t.get("items"), path + "[]", seen)
            elif kind == "map":
                visit(t.get("values"), path + "{}", seen)

    visit(schema, "", set())
    return probs


def fix_schema(schema: dict, *, reorder: bool = True, doc: str | None = None) -> tuple[dict, bool]:
    """A strictly valid copy of ``schema`` → ``(fixed, union_order_changed)``.

    For each record field whose default does not match its union's first branch:

    * ``reorder=True``: move the branch the default belongs to to the front (``["float",
      "null"]`` with default null → ``["null", "float"]``). A field without a default that has a
      nullable union gets null first too (the convention strict tools expect).
    * ``reorder=False``: keep the branch order and drop the mismatching default instead (the
      data encoding is unchanged, so the data blocks can be copied verbatim).

    ``doc``: set as the top-level ``doc`` when the schema has none.
    """
    fixed = copy.deepcopy(schema)
    named: dict[str, Any] = {}
    _walk_named(fixed, None, named)
    changed_order = False

    def visit(t: Any, seen: set[int]) -> None:
        nonlocal changed_order
        if isinstance(t, list):
            for b in t:
                visit(b, seen)
        elif isinstance(t, dict):
            if id(t) in seen:
                return
            seen.add(id(t))
            kind = t.get("type")
            if kind in ("record", "error"):
                for f in t.get("fields", []) or []:
                    ft = f.get("type")
                    if isinstance(ft, list) and ft:
                        has_default = "default" in f
                        if has_default and not _default_matches(ft, f["default"], named):
                            hit = next((i for i, b in enumerate(ft) if _default_matches(b, f["default"], named)), None)
                            if reorder and hit is not None:
                                ft.insert(0, ft.pop(hit))
                                changed_order = True
                            else:
                                del f["default"]
                        elif not has_default and reorder and "null" in ft and ft[0] != "null":
                            ft.insert(0, ft.pop(ft.index("null")))
                            changed_order = True
                    visit(ft, seen)
            elif kind == "array":
                visit(t.get("items"), seen)
            elif kind == "map":
                visit(t.get("values"), seen)

    visit(fixed, set())
    if doc and not fixed.get("doc"):
        fixed["doc"] = doc
    return fixed, changed_order


@functools.lru_cache(maxsize=None)
def _bundled_docs() -> dict[str, str]:
    """Top-level doc of each bundled .avsc, by the schema's full name."""
    out: dict[str, str] = {}
    for p in sorted(AVRO_SCHEMAS_DIR.glob("*.avsc")):
        try:
            s = json.loads(p.read_text(encoding="utf-8"))
        except ValueError:
            continue
        if isinstance(s, dict) and s.get("doc"):
            out.setdefault(schema_fullname(s), s["doc"])
    return out


@functools.lru_cache(maxsize=64)
def _fixed_schema_text(schema_text: str, reorder: bool, doc: str | None, map_doc: str | None) -> tuple[str | None, bool]:
    """``(fixed schema text or None when nothing changes, union order changed)`` for a header's
    schema text (cached: the fix walks the whole schema, ~1 ms for ZTF's)."""
    try:
        schema = json.loads(schema_text)
    except ValueError as e:
        raise AlertDecodeError(f"invalid writer schema in Avro header: not JSON: {e}") from e
    if not isinstance(schema, dict):
        raise AlertDecodeError(f"invalid writer schema in Avro header: a {type(schema).__name__}, not a record")
    if doc is None and not schema.get("doc"):
        doc = map_doc or _bundled_docs().get(schema_fullname(schema))
    fixed, reordered = fix_schema(schema, reorder=reorder, doc=doc)
    if fixed == schema:
        return None, False
    return json.dumps(fixed), reordered


@functools.lru_cache(maxsize=64)
def _schema_json(schema_text: str) -> dict:
    """The parsed JSON of a schema text (cached and shared: callers must not modify it)."""
    return json.loads(schema_text)


def _reencode_blocks(c: _Container, data: bytes, old_text: str, new_text: str) -> tuple[list[tuple[int, bytes]], list]:
    """Every block decoded with ``old_text`` and re-encoded with ``new_text``; also the records."""
    old, new = _parsed(old_text), _parsed(new_text)
    codec = c.codec
    blocks, records = [], []
    for i, (count, start, end) in enumerate(c.blocks):
        recs = _decode_block(old, _decompress(codec, bytes(data[start:end])), count, i)
        records += recs
        buf = io.BytesIO()
        for r in recs:
            fastavro.schemaless_writer(buf, new, r)
        blocks.append((count, _compress(codec, buf.getvalue())))
    return blocks, records


def fix_schema_header(data: bytes, smap: SchemaMap | None = None, *, reorder: bool = True,
                      doc: str | None = None) -> bytes:
    """Rewrite a container's header so strict Avro readers (Java, BigQuery) accept it.

    * Nullable unions whose default (null) is not their first branch are reordered null-first
      (``reorder=True``, the default) — or, with ``reorder=False``, keep their order and lose
      the invalid default.
    * A missing top-level ``doc`` is restored (from ``doc``, the map's ``SCHEMA_DOC``, or the
      bundled schema of the same full name).
    * Other metadata, the codec and the sync marker are kept.

    Data blocks: the union branch INDEX is part of the binary encoding (``["float","null"]``
    writes a float as index 0; ``["null","float"]`` as index 1), so reordering cannot keep the
    data bytes. When no branch order changes (doc/default-only fixes, ``reorder=False``) the
    data blocks are copied byte for byte; otherwise each record is decoded with the old
    schema and re-encoded with the fixed one (same values; tests prove it for every real
    alert). Idempotent: an already-fixed container is returned unchanged.
    """
    c = _parse_container(data)
    map_doc = smap.get("SCHEMA_DOC") if smap is not None else None
    text, reordered = _fixed_schema_text(c.schema_text, reorder, doc, map_doc)
    if text is None:
        return bytes(data)
    if not reordered:
        head = _container_bytes(text, [], c.sync, c.meta)
        return head + bytes(data[c.header_end :])
    blocks, _ = _reencode_blocks(c, data, c.schema_text, text)
    return _container_bytes(text, blocks, c.sync, c.meta)


def fix_and_decode(data: bytes, smap: SchemaMap | None = None, *, reorder: bool = True,
                   doc: str | None = None) -> tuple[bytes, dict, dict]:
    """``fix_schema_header`` and ``decode_with_schema`` of the result, in one pass:
    ``(fixed bytes, the one record, fixed writer schema)``.

    The record is decoded once (the fixed bytes hold the same values). The writer schema
    dict is cached and shared: do not modify it. Raises :class:`AlertDecodeError` (one line)
    unless the container holds exactly one record.
    """
    c = _parse_container(data)
    n = c.n_records
    if n != 1:
        raise AlertDecodeError(f"Avro container holds {n} records, expected exactly 1")
    map_doc = smap.get("SCHEMA_DOC") if smap is not None else None
    text, reordered = _fixed_schema_text(c.schema_text, reorder, doc, map_doc)
    if text is not None and reordered:
        blocks, records = _reencode_blocks(c, data, c.schema_text, text)
        fixed = _container_bytes(text, blocks, c.sync, c.meta)
        rec = records[0]
    else:
        rec, _ = _decode_one(data)
        fixed = bytes(data) if text is None else _container_bytes(text, [], c.sync, c.meta) + bytes(data[c.header_end :])
    if not isinstance(rec, dict):
        raise AlertDecodeError(f"Avro container record is a {type(rec).__name__}, expected a record")
    return fixed, rec, _schema_json(text if text is not None else c.schema_text)


# =============================================================================================
# photometry
# =============================================================================================


def mag_to_flux(mag, magzp, magerr):
    """``(flux, fluxerr)`` in the units of zero point ``magzp``; vectorised over numpy arrays.

    ``flux = 10 ** (-0.4 * (mag - magzp))`` and ``fluxerr = flux * magerr * ln(10) / 2.5``
    (d flux / flux = ln(10)/2.5 · d mag ≈ 0.921 · d mag). The system we re-create used
    ``ln(10 / 2.5)`` ≈ 1.386 here, overstating flux errors by 50 %. NaN in → NaN out.
    """
    mag = np.asarray(mag, dtype=np.float64)
    magzp = np.asarray(magzp, dtype=np.float64)
    magerr = np.asarray(magerr, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        flux = np.power(10.0, -0.4 * (mag - magzp))
        fluxerr = flux * magerr * LN10_OVER_2P5
    if flux.ndim == 0:
        return float(flux), float(fluxerr)
    return flux, fluxerr


def flux_to_mag(flux, fluxerr, zp):
    """Inverse of :func:`mag_to_flux`: ``(mag, magerr)``; NaN where flux <= 0."""
    flux = np.asarray(flux, dtype=np.float64)
    fluxerr = np.asarray(fluxerr, dtype=np.float64)
    zp = np.asarray(zp, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = flux > 0
        mag = np.where(pos, zp - 2.5 * np.log10(np.where(pos, flux, 1.0)), np.nan)
        magerr = np.where(pos, fluxerr / np.where(pos, flux, 1.0) / LN10_OVER_2P5, np.nan)
    if mag.ndim == 0:
        return float(mag), float(magerr)
    return mag, magerr


def _f(x: Any) -> float:
    """Float or NaN, never raises."""
    if x is None or isinstance(x, bool):
        return math.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _truthy_diffpos(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        return v == v and v > 0
    if isinstance(v, (str, bytes)):
        s = v.decode() if isinstance(v, bytes) else v
        return s.strip().lower() in ("t", "1", "true", "y", "yes")
    return False


_LC_ARRAYS = ("mjd", "band", "filter", "mag", "magerr", "magzp", "flux", "fluxerr", "zpsys",
              "source_id", "detected", "limmag", "isdiffpos")


@dataclass(frozen=True, eq=False)
class LightCurve:
    """Equal-length arrays, one row per source (detection or upper limit), sorted by time.

    ``flux``/``fluxerr`` are in the units of zero point ``magzp`` (system ``zpsys``).
    ``source_id`` is -1 for upper limits; ``limmag`` is their limiting magnitude (NaN for other
    rows); ``isdiffpos`` is True for a positive subtraction (False for upper limits).
    """

    mjd: np.ndarray
    band: np.ndarray
    filter: np.ndarray
    mag: np.ndarray
    magerr: np.ndarray
    magzp: np.ndarray
    flux: np.ndarray
    fluxerr: np.ndarray
    zpsys: np.ndarray
    source_id: np.ndarray
    detected: np.ndarray
    limmag: np.ndarray
    isdiffpos: np.ndarray
    object_id: Any = None
    source_id_current: Any = None

    def __post_init__(self) -> None:
        n = {len(getattr(self, a)) for a in _LC_ARRAYS}
        if len(n) > 1:
            raise ValueError(f"LightCurve arrays differ in length: {sorted(n)}")
        for a in _LC_ARRAYS:
            getattr(self, a).flags.writeable = False

    def __len__(self) -> int:
        return len(self.mjd)

    def select(self, mask) -> "LightCurve":
        """Rows where ``mask`` (bool array or index array) is true, as a new LightCurve."""
        kw = {a: np.array(getattr(self, a)[mask]) for a in _LC_ARRAYS}
        return LightCurve(**kw, object_id=self.object_id, source_id_current=self.source_id_current)

    def detections(self) -> "LightCurve":
        return self.select(self.detected)

    def to_astropy(self, detections_only: bool = False):
        """An ``astropy.table.Table`` with sncosmo's photometric columns: time (MJD), band,
        flux, fluxerr, zp, zpsys. Upper limits have NaN flux; sncosmo needs
        ``detections_only=True`` (or ``lc.detections().to_astropy()``)."""
        from astropy.table import Table

        lc = self.detections() if detections_only else self
        t = Table(
            {
                "time": np.array(lc.mjd),
                "band": np.array(lc.band),
                "flux": np.array(lc.flux),
                "fluxerr": np.array(lc.fluxerr),
                "zp": np.array(lc.magzp),
                "zpsys": np.array(lc.zpsys),
            }
        )
        t.meta["object_id"] = self.object_id
        t.meta["source_id"] = self.source_id_current
        return t


def light_curve(alert: dict, smap: SchemaMap) -> LightCurve:
    """The alert's light curve: the triggering source and every previous source, sorted by time.

    A row is a detection when it is not an upper limit (map's ``upper_limit`` rule) and its
    flux is finite (magnitude AND zero point present, or the flux itself for flux surveys).
    Never raises on odd content: a null/NaN/missing magnitude (or flux) makes a row a
    non-detection; an unknown filter gives empty band and filter strings.
    """
    d = smap
    src = source_record(alert, smap)
    rows = ([src] if src else []) + prv_records(alert, smap)
    k_sid, k_time, k_filter = d["sourceId"], d["time"], d["filter"]
    ul = d.get("upper_limit") or None
    k_lim = ul.get("limmag") if ul else None
    null_sid_is_ul = bool(ul) and ul.get("rule") == "null_source_id"
    mag_based = d.get("mag") is not None
    k_dp = d.get("isdiffpos")
    k_flux_sign = d.get("flux")  # without an isdiffpos field, the flux sign decides
    to_mjd = 2400000.5 if d["time_format"] == "jd" else 0.0
    zpsys = d.get("ZPSYS") or "ab"

    n = len(rows)
    mjd = np.full(n, np.nan)
    mag = np.full(n, np.nan)
    magerr = np.full(n, np.nan)
    magzp = np.full(n, np.nan)
    flux = np.full(n, np.nan)
    fluxerr = np.full(n, np.nan)
    limmag = np.full(n, np.nan)
    sid = np.full(n, -1, dtype=np.int64)
    ul_row = np.zeros(n, dtype=bool)
    dp = np.zeros(n, dtype=bool)
    letters: list[str] = []
    seen: set[int] = set()
    keep = np.ones(n, dtype=bool)
    for i, r in enumerate(rows):
        mjd[i] = _f(r.get(k_time)) - to_mjd
        letters.append(smap.generic_filter(r.get(k_filter)) or "")
        s = r.get(k_sid)
        if s is None or isinstance(s, bool):
            ul_row[i] = null_sid_is_ul
        else:
            try:
                sid[i] = int(s)
            except (TypeError, ValueError, OverflowError):
                ul_row[i] = null_sid_is_ul
        if sid[i] >= 0:
            if int(sid[i]) in seen:  # e.g. DECAT's `sources` repeats the trigger
                keep[i] = False
            seen.add(int(sid[i]))
        if mag_based:
            mag[i] = _f(r.get(d["mag"]))
            magerr[i] = _f(r.get(d["magerr"]))
            magzp[i] = _f(r.get(d["magzp"]))
        else:
            flux[i] = _f(r.get(d["flux"]))
            fluxerr[i] = _f(r.get(d["fluxerr"]))
            magzp[i] = _f(d.get("FLUX_ZP"))
        if k_lim:
            limmag[i] = _f(r.get(k_lim))
        if k_dp:
            dp[i] = _truthy_diffpos(r.get(k_dp))
        elif k_flux_sign:
            dp[i] = _f(r.get(k_flux_sign)) > 0
        else:
            dp[i] = True
    if mag_based:
        flux, fluxerr = mag_to_flux(mag, magzp, magerr)
        detected = ~ul_row & np.isfinite(mag) & np.isfinite(flux)  # needs mag and zero point
    else:
        mag, magerr = flux_to_mag(flux, fluxerr, magzp)
        detected = ~ul_row & np.isfinite(flux)
    dp &= detected
    sid = np.where(ul_row, -1, sid)
    limmag = np.where(detected, np.nan, limmag)
    filt = np.array(letters, dtype=str) if letters else np.array([], dtype="<U1")
    band = np.array([smap.sncosmo_band(x) or "" for x in letters], dtype=str) if letters else np.array([], dtype="<U1")
    idx = np.flatnonzero(keep)
    order = idx[np.argsort(mjd[idx], kind="stable")]
    return LightCurve(
        mjd=mjd[order],
        band=band[order],
        filter=filt[order],
        mag=np.asarray(mag)[order],
        magerr=np.asarray(magerr)[order],
        magzp=magzp[order],
        flux=np.asarray(flux)[order],
        fluxerr=np.asarray(fluxerr)[order],
        zpsys=np.array([zpsys] * len(order), dtype=str) if len(order) else np.array([], dtype="<U2"),
        source_id=sid[order],
        detected=detected[order],
        limmag=limmag[order],
        isdiffpos=dp[order],
        object_id=get_path(alert, smap["objectId"]),
        source_id_current=src.get(k_sid) if src else None,
    )
