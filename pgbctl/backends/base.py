"""The backend interface and its one implementation over Google's official client libraries.

Both backends run this same code: ``gcp`` with default credentials, ``local`` with the clients
pointed at the emulators (see :mod:`pgbctl.clients`). What differs is small and lives in the
subclasses: how services are made ready, how a bucket notification is set up, and how waiting
messages are counted.
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable

from google.api_core import exceptions as gexc

from pgbctl import naming
from pgbctl.backends import bqschema
from pgbctl.naming import Instance, Kind
from pgbctl.plan import Action, Change, Plan, RKind, Resource, resource

__all__ = ["BackendError", "Backend", "Status", "ResourceStatus"]


class BackendError(RuntimeError):
    """A backend operation failed; the message is one line for the user."""


@dataclass
class ResourceStatus:
    kind: str
    name: str
    exists: bool
    detail: dict = field(default_factory=dict)


@dataclass
class Status:
    backend: str
    instance: dict
    resources: list[ResourceStatus] = field(default_factory=list)
    processes: list[dict] = field(default_factory=list)
    services: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _mine(kind: Kind, name: str, inst: Instance) -> str | None:
    """The stub if ``name`` belongs to ``inst``, else None."""
    try:
        stub, other = naming.parse(kind, name, project=inst.project)
    except naming.NameError_:
        return None
    return stub if (other.survey, other.testid) == (inst.survey, inst.testid) else None


def _short(path: str) -> str:
    return path.rsplit("/", 1)[-1]


class Backend:
    """Create, observe, change and delete an instance's resources."""

    name = "abstract"

    def __init__(self, project: str):
        self.project = project
        self._clients = None

    # -- hooks for subclasses -----------------------------------------------------------------
    def ensure_ready(self) -> None:
        """Make the backend usable (local: start the emulators)."""

    def make_clients(self):  # pragma: no cover - subclasses
        raise NotImplementedError

    def observe_notifications(self, inst: Instance, buckets: list[str]) -> list[Resource]:
        raise NotImplementedError

    def apply_notification(self, change: Change) -> None:
        raise NotImplementedError

    def count_waiting(self, subscription: str) -> int | None:
        return None

    def processes(self, inst: Instance) -> list[dict]:
        return []

    def services(self) -> list[dict]:
        return []

    def bucket_location(self) -> str | None:
        return None

    # -- clients ------------------------------------------------------------------------------
    @property
    def clients(self):
        if self._clients is None:
            self.ensure_ready()
            self._clients = self.make_clients()
        return self._clients

    def topic_path(self, name: str) -> str:
        return f"projects/{self.project}/topics/{name}"

    def subscription_path(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    # -- observe ------------------------------------------------------------------------------
    def observe(self, inst: Instance, *, objects: bool = True) -> list[Resource]:
        """Every resource of ``inst`` that exists now, with the spec the plan compares."""
        c = self.clients
        out: list[Resource] = []
        proj = f"projects/{self.project}"
        for t in c.publisher.list_topics(request={"project": proj}):
            if _mine(Kind.topic, _short(t.name), inst):
                out.append(resource(RKind.topic, _short(t.name)))
        for s in c.subscriber.list_subscriptions(request={"project": proj}):
            if _mine(Kind.subscription, _short(s.name), inst):
                out.append(resource(RKind.subscription, _short(s.name), topic=_short(s.topic)))
        buckets = [b.name for b in c.storage.list_buckets() if _mine(Kind.bucket, b.name, inst)]
        out += [resource(RKind.bucket, b) for b in buckets]
        out += self.observe_notifications(inst, buckets)
        files_bucket = inst.bucket("broker_files")
        if objects and files_bucket in buckets:
            for blob in c.storage.list_blobs(files_bucket):
                md5 = base64.b64decode(blob.md5_hash).hex() if blob.md5_hash else ""
                out.append(resource(RKind.object, f"{files_bucket}/{blob.name}", md5=md5))
        ds_id = f"{self.project}.{inst.dataset}"
        try:
            c.bigquery.get_dataset(ds_id)
        except gexc.NotFound:
            return out
        out.append(resource(RKind.dataset, ds_id))
        for t in c.bigquery.list_tables(ds_id):
            if t.table_id in naming.TABLES:
                table = c.bigquery.get_table(f"{ds_id}.{t.table_id}")
                canon = bqschema.canonical([f.to_api_repr() for f in table.schema])
                from pgbctl.plan import digest

                out.append(
                    resource(RKind.table, f"{ds_id}.{t.table_id}", schema=digest(canon.encode()))
                )
        return out

    # -- apply --------------------------------------------------------------------------------
    def apply(
        self,
        the_plan: Plan,
        inst: Instance,
        *,
        broker_files: dict[str, bytes] | None = None,
        table_schemas: dict[str, list[dict]] | None = None,
        progress: Callable[[Change], None] | None = None,
    ) -> list[tuple[Change, str | None]]:
        """Carry out every change of ``the_plan``; returns (change, error or None) for each.

        Stops at the first failure (later changes may depend on it) and reports it.
        """
        results: list[tuple[Change, str | None]] = []
        for ch in the_plan.changes:
            try:
                self.apply_one(ch, inst, broker_files or {}, table_schemas or {})
                results.append((ch, None))
            except Exception as e:  # noqa: BLE001 - reported to the user, one line
                msg = f"{ch.action.value} {ch.resource}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                results.append((ch, msg))
                break
            finally:
                if progress:
                    progress(ch)
        return results

    def apply_one(
        self, ch: Change, inst: Instance, broker_files: dict[str, bytes], table_schemas: dict
    ) -> None:
        r = ch.resource
        if ch.action in (Action.delete, Action.replace):
            self._delete(r)
        if ch.action in (Action.create, Action.replace, Action.update):
            self._create(r, inst, broker_files, table_schemas, update=ch.action is Action.update)

    def _create(self, r: Resource, inst, broker_files, table_schemas, update: bool) -> None:
        c = self.clients
        spec = r.specd()
        if r.kind is RKind.topic:
            try:
                c.publisher.create_topic(name=self.topic_path(r.name))
            except gexc.AlreadyExists:
                pass
        elif r.kind is RKind.subscription:
            try:
                c.subscriber.create_subscription(
                    request={
                        "name": self.subscription_path(r.name),
                        "topic": self.topic_path(spec["topic"]),
                        "ack_deadline_seconds": 60,
                        "message_retention_duration": {"seconds": 7 * 24 * 3600},
                    }
                )
            except gexc.AlreadyExists:
                pass
        elif r.kind is RKind.bucket:
            try:
                c.storage.create_bucket(r.name, location=self.bucket_location())
            except gexc.Conflict:
                pass
        elif r.kind is RKind.notification:
            self.apply_notification(Change(Action.update if update else Action.create, r))
        elif r.kind is RKind.object:
            bucket, _, path = r.name.partition("/")
            prefix = inst.bucket("broker_files") + "/"
            key = r.name[len(prefix) :]
            data = broker_files[key]
            c.storage.bucket(bucket).blob(path).upload_from_string(data)
        elif r.kind is RKind.dataset:
            from google.cloud import bigquery

            ds = bigquery.Dataset(r.name)
            ds.description = f"pgbctl alerts warehouse for {inst.label}"
            c.bigquery.create_dataset(ds, exists_ok=True)
        elif r.kind is RKind.table:
            from google.cloud import bigquery

            stub = r.name.rsplit(".", 1)[-1]
            schema = [bigquery.SchemaField.from_api_repr(f) for f in table_schemas[stub]]
            if update:
                table = c.bigquery.get_table(r.name)
                table.schema = schema
                c.bigquery.update_table(table, ["schema"])
            else:
                c.bigquery.create_table(bigquery.Table(r.name, schema=schema), exists_ok=True)
        else:  # pragma: no cover
            raise BackendError(f"cannot create {r}")

    def _delete(self, r: Resource) -> None:
        c = self.clients
        try:
            if r.kind is RKind.topic:
                c.publisher.delete_topic(topic=self.topic_path(r.name))
            elif r.kind is RKind.subscription:
                c.subscriber.delete_subscription(subscription=self.subscription_path(r.name))
            elif r.kind is RKind.bucket:
                bucket = c.storage.bucket(r.name)
                # delete objects in pages: Bucket.delete(force=True) refuses > 256 objects
                while True:
                    blobs = list(c.storage.list_blobs(r.name, max_results=1000))
                    if not blobs:
                        break
                    with ThreadPoolExecutor(8) as pool:
                        list(pool.map(lambda b: b.delete(), blobs))
                bucket.delete()
            elif r.kind is RKind.notification:
                self.apply_notification(Change(Action.delete, r))
            elif r.kind is RKind.object:
                bucket, _, path = r.name.partition("/")
                c.storage.bucket(bucket).blob(path).delete()
            elif r.kind is RKind.dataset:
                c.bigquery.delete_dataset(r.name, delete_contents=True, not_found_ok=True)
            elif r.kind is RKind.table:
                c.bigquery.delete_table(r.name, not_found_ok=True)
        except gexc.NotFound:
            pass

    # -- status -------------------------------------------------------------------------------
    def status(self, inst: Instance, *, count_waiting: bool = True) -> Status:
        """Every desired resource: exists?, messages waiting, objects, rows; plus processes."""
        c = self.clients
        have = {r.key: r for r in self.observe(inst, objects=False)}
        st = Status(backend=self.name, instance={"survey": inst.survey, "testid": inst.testid, "project": inst.project})
        for stub in naming.TOPICS:
            name = inst.topic(stub)
            st.resources.append(ResourceStatus("topic", name, (RKind.topic, name) in have))
        subs = [inst.subscription(stub) for stub in naming.SUBSCRIPTIONS]
        present = [n for n in subs if (RKind.subscription, n) in have]
        waiting: dict[str, int | None] = {}
        if count_waiting and present:
            with ThreadPoolExecutor(min(8, len(present))) as pool:
                waiting = dict(zip(present, pool.map(self.count_waiting, present)))
        for name in subs:
            exists = name in present
            detail = {"waiting": waiting[name]} if name in waiting else {}
            st.resources.append(ResourceStatus("subscription", name, exists, detail))
        for stub in naming.BUCKETS:
            name = inst.bucket(stub)
            exists = (RKind.bucket, name) in have
            detail = {}
            if exists:
                detail["objects"] = sum(1 for _ in c.storage.list_blobs(name))
            st.resources.append(ResourceStatus("bucket", name, exists, detail))
        ds_id = f"{self.project}.{inst.dataset}"
        st.resources.append(ResourceStatus("dataset", ds_id, (RKind.dataset, ds_id) in have))
        for stub in naming.TABLES:
            name = inst.table(stub)
            exists = (RKind.table, name) in have
            detail = {}
            if exists:
                rows = list(c.bigquery.query(f"SELECT COUNT(*) AS n FROM `{name}`").result())
                detail["rows"] = int(rows[0]["n"])
            st.resources.append(ResourceStatus("table", name, exists, detail))
        st.processes = self.processes(inst)
        st.services = self.services()
        return st

    # -- data helpers used by the CLI and tests ------------------------------------------------
    def publish(self, topic: str, messages, attributes_for=None, timeout: float = 60) -> int:
        """Publish an iterable of bytes (or (bytes, attrs) pairs) to a topic; returns count.
        Raises on the first failed publish (nothing is silently dropped)."""
        pub = self.clients.publisher
        path = self.topic_path(topic)
        futures = []
        for m in messages:
            data, attrs = (m if isinstance(m, tuple) else (m, {}))
            futures.append(pub.publish(path, data, **{k: str(v) for k, v in attrs.items()}))
        for f in futures:
            f.result(timeout=timeout)
        return len(futures)

    def wait_until(self, pred: Callable[[], bool], timeout: float, every: float = 0.5) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return True
            time.sleep(every)
        return pred()


def schema_json(survey: str) -> dict[str, list[dict]]:
    return {t: bqschema.load_template(survey, t) for t in naming.TABLES}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
