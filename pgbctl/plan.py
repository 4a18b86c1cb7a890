"""Plan then apply: the desired resources of an instance, and a pure diff against what exists.

Nothing here talks to a backend. :func:`desired` lists what an instance consists of,
:func:`plan` compares that with what a backend *observed* and returns :class:`Change` values,
:func:`plan_delete` lists what to remove. ``backends.*.apply`` is the only code that acts on a
change. Plans are plain data, so they are printed for ``--dry-run`` and tested as data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Mapping

from pgbctl import naming
from pgbctl.naming import Instance

__all__ = ["RKind", "Resource", "Action", "Change", "Plan", "desired", "plan", "plan_delete"]


class RKind(str, Enum):
    """Resource kinds a plan deals with, in creation order."""

    topic = "topic"
    subscription = "subscription"
    bucket = "bucket"
    notification = "notification"
    object = "object"
    dataset = "dataset"
    table = "table"


_ORDER = {k: i for i, k in enumerate(RKind)}


@dataclass(frozen=True)
class Resource:
    """One resource. ``spec`` holds what must match for the resource to be up to date
    (e.g. a subscription's topic, a table's schema digest, an object's md5)."""

    kind: RKind
    name: str
    spec: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[RKind, str]:
        return (self.kind, self.name)

    def specd(self) -> dict[str, str]:
        return dict(self.spec)

    def __str__(self) -> str:
        return f"{self.kind.value} {self.name}"


def resource(kind: RKind, name: str, **spec: str) -> Resource:
    return Resource(RKind(kind), name, tuple(sorted((k, str(v)) for k, v in spec.items())))


class Action(str, Enum):
    create = "create"
    update = "update"
    replace = "replace"  # delete then create (e.g. a subscription attached to another topic)
    delete = "delete"


_SYMBOL = {Action.create: "+", Action.update: "~", Action.replace: "-/+", Action.delete: "-"}


@dataclass(frozen=True)
class Change:
    action: Action
    resource: Resource
    reason: str = ""
    # for updates: the observed spec, so a dry run shows old → new
    before: tuple[tuple[str, str], ...] = ()

    @property
    def symbol(self) -> str:
        return _SYMBOL[self.action]

    def as_dict(self) -> dict:
        return {
            "action": self.action.value,
            "kind": self.resource.kind.value,
            "name": self.resource.name,
            "reason": self.reason,
            "spec": self.resource.specd(),
        }


@dataclass(frozen=True)
class Plan:
    changes: tuple[Change, ...] = ()
    unchanged: tuple[Resource, ...] = field(default=())

    def __bool__(self) -> bool:  # a plan is "truthy" when it would change something
        return bool(self.changes)

    def __len__(self) -> int:
        return len(self.changes)

    def by_action(self, action: Action) -> list[Change]:
        return [c for c in self.changes if c.action is action]

    def summary(self) -> dict[str, int]:
        out = {a.value: 0 for a in Action}
        for c in self.changes:
            out[c.action.value] += 1
        out["unchanged"] = len(self.unchanged)
        return out

    def as_dict(self) -> dict:
        return {"changes": [c.as_dict() for c in self.changes], "summary": self.summary()}


# ---- the desired state of an instance ---------------------------------------------------------


def digest(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def desired(
    inst: Instance,
    *,
    table_schemas: Mapping[str, str],
    broker_files: Mapping[str, bytes],
) -> list[Resource]:
    """Everything one broker instance consists of.

    ``table_schemas`` maps table stub → canonical JSON text of its schema;
    ``broker_files`` maps object path → bytes for the ``broker_files`` bucket.
    """
    out: list[Resource] = []
    for stub in naming.TOPICS:
        out.append(resource(RKind.topic, inst.topic(stub)))
    for stub in naming.SUBSCRIPTIONS:
        topic_stub = naming.SUBSCRIPTION_TOPIC[stub]
        out.append(resource(RKind.subscription, inst.subscription(stub), topic=inst.topic(topic_stub)))
    for stub in naming.BUCKETS:
        out.append(resource(RKind.bucket, inst.bucket(stub)))
    out.append(
        resource(
            RKind.notification,
            inst.bucket("alert_avros"),
            topic=inst.topic("alert_avros"),
            event_types="OBJECT_FINALIZE",
            payload_format="JSON_API_V1",
        )
    )
    files_bucket = inst.bucket("broker_files")
    for path in sorted(broker_files):
        out.append(resource(RKind.object, f"{files_bucket}/{path}", md5=digest(broker_files[path])))
    out.append(resource(RKind.dataset, f"{inst.project}.{inst.dataset}"))
    for stub in naming.TABLES:
        schema = table_schemas[stub]
        out.append(resource(RKind.table, inst.table(stub), schema=digest(schema.encode())))
    return out


# ---- the diff ---------------------------------------------------------------------------------

# A spec change on these kinds can be done in place; on the others the resource is replaced.
_UPDATABLE = {RKind.object, RKind.table, RKind.notification}


def _sorted(changes: Iterable[Change]) -> tuple[Change, ...]:
    changes = list(changes)
    creates = [c for c in changes if c.action is not Action.delete]
    deletes = [c for c in changes if c.action is Action.delete]
    creates.sort(key=lambda c: (_ORDER[c.resource.kind], c.resource.name))
    deletes.sort(key=lambda c: (-_ORDER[c.resource.kind], c.resource.name))
    return tuple(deletes + creates)


def plan(
    desired_: Iterable[Resource], observed: Iterable[Resource], *, prune: bool = False
) -> Plan:
    """Changes that turn ``observed`` into ``desired_``.

    Observed resources that are not desired are left alone unless ``prune`` (then deleted).
    A resource whose observed spec lacks a key the desired spec has is treated as up to date
    for that key (backends report only what they can observe cheaply).
    """
    want = {r.key: r for r in desired_}
    have = {r.key: r for r in observed}
    changes: list[Change] = []
    unchanged: list[Resource] = []
    for key, r in want.items():
        if key not in have:
            changes.append(Change(Action.create, r, "missing"))
            continue
        old = have[key].specd()
        diffs = [k for k, v in r.specd().items() if k in old and old[k] != v]
        if not diffs:
            unchanged.append(r)
            continue
        action = Action.update if r.kind in _UPDATABLE else Action.replace
        reason = ", ".join(f"{k}: {old[k]} -> {r.specd()[k]}" for k in diffs)
        changes.append(Change(action, r, reason, before=have[key].spec))
    if prune:
        for key, r in have.items():
            if key not in want:
                changes.append(Change(Action.delete, r, "not desired"))
    return Plan(_sorted(changes), tuple(sorted(unchanged, key=lambda r: (_ORDER[r.kind], r.name))))


def plan_delete(observed: Iterable[Resource]) -> Plan:
    """Delete everything observed (reverse dependency order)."""
    return Plan(_sorted(Change(Action.delete, r, "delete instance") for r in observed))
