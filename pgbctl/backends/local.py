"""The local backend: the same client code as gcp, pointed at emulators on 127.0.0.1.

Pub/Sub: Google's emulator. Cloud Storage: fake-gcs-server (its bucket notifications publish
real OBJECT_FINALIZE messages to the Pub/Sub emulator). Warehouse: see
:mod:`pgbctl.local.services`. Services start on demand and stay up until ``pgbctl local down``.
"""

from __future__ import annotations

import time
import warnings

from pgbctl.backends.base import Backend, BackendError
from pgbctl.naming import Instance
from pgbctl.plan import Action, Change, RKind, Resource, resource


class LocalBackend(Backend):
    name = "local"

    def __init__(self, project: str):
        super().__init__(project)
        self._endpoints = None

    def ensure_ready(self) -> None:
        from pgbctl.local import services

        try:
            services.up(project=self.project)
            self._endpoints = services.endpoints(project=self.project)
        except services.LocalServicesError as e:
            raise BackendError(str(e)) from None

    def make_clients(self):
        from pgbctl.clients import Clients

        return Clients.for_backend("local", self.project, self._endpoints)

    # fake-gcs-server publishes notifications for every bucket of the server to one topic,
    # configured at its start; a notification "exists" when that topic is this instance's.
    def observe_notifications(self, inst: Instance, buckets: list[str]) -> list[Resource]:
        from pgbctl.local import services

        target = inst.bucket("alert_avros")
        st = services.status(services=["storage"], check_health=False)["storage"]
        n = st.options.get("notify") or {}
        if (target in buckets and n.get("project") == self.project
                and n.get("topic") == inst.topic("alert_avros") and n.get("bucket") == target):
            return [
                resource(
                    RKind.notification,
                    target,
                    topic=inst.topic("alert_avros"),
                    event_types="OBJECT_FINALIZE",
                    payload_format="JSON_API_V1",
                )
            ]
        return []

    def apply_notification(self, change: Change) -> None:
        from pgbctl.local import services

        if change.action is Action.delete:
            st = services.status(services=["storage"], check_health=False)["storage"]
            n = st.options.get("notify") or {}
            if n.get("bucket") != change.resource.name:
                return  # the storage service notifies for another instance now: leave it
            self._release_storage_connections()
            services.up(["storage"], project=self.project, gcs_notify_topic=None)
        else:
            topic = change.resource.specd()["topic"]
            self._release_storage_connections()
            services.up(["storage"], project=self.project,
                        gcs_notify_topic=f"projects/{self.project}/topics/{topic}",
                        gcs_notify_bucket=change.resource.name, gcs_notify_events="finalize")
        # fake-gcs-server restarted with its data on disk, normally on the same port; if the
        # port had to change, the clients are rebuilt for the new address
        self._follow_endpoints()

    def _release_storage_connections(self) -> None:
        """Close our keep-alive connections to the storage service before it restarts: the
        server's side of a connection the client keeps open lingers in FIN_WAIT2 after the
        server dies and stops the restarted server from binding the same port."""
        c = self._clients
        st = c._cache.get("storage") if c is not None else None
        http = getattr(st, "_http_internal", None) or getattr(st, "_http", None) if st is not None else None
        if http is not None and hasattr(http, "close"):
            try:
                http.close()
            except Exception:  # noqa: BLE001 - best effort
                pass

    def _follow_endpoints(self) -> None:
        from pgbctl.local import services

        try:
            now = services.endpoints(project=self.project)
        except services.LocalServicesError as e:
            raise BackendError(str(e)) from None
        if self._endpoints is not None and now != self._endpoints and self._clients is not None:
            self._clients.close()
            self._clients = None  # rebuilt on next use, for the new address
        self._endpoints = now

    def count_waiting(self, subscription: str, cap: int = 200_000, timeout: float = 60.0) -> int | None:
        """Messages waiting in a subscription. The emulator has no metrics, so pull without
        acking (up to ``cap``), then hand every message straight back (ack deadline 0).
        Messages another subscriber holds (outstanding leases) are not counted."""
        from google.api_core import exceptions as gexc

        sub = self.clients.subscriber
        path = self.subscription_path(subscription)
        ack_ids: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while len(ack_ids) < cap and time.monotonic() < deadline:
                try:
                    with warnings.catch_warnings():  # deprecated on Google, honoured by the emulator
                        warnings.simplefilter("ignore", DeprecationWarning)
                        resp = sub.pull(request={"subscription": path, "max_messages": 1000,
                                                 "return_immediately": True}, timeout=10)
                except gexc.DeadlineExceeded:
                    break
                if not resp.received_messages:
                    break
                ack_ids.extend(m.ack_id for m in resp.received_messages)
        finally:
            for i in range(0, len(ack_ids), 1000):
                sub.modify_ack_deadline(
                    request={"subscription": path, "ack_ids": ack_ids[i : i + 1000], "ack_deadline_seconds": 0}
                )
        return len(ack_ids)

    def processes(self, inst: Instance) -> list[dict]:
        from pgbctl.local import services

        prefix = f"{inst.survey}-"
        suffix = f"-{inst.testid}" if inst.testid else ""
        out = []
        for name, p in services.list_processes().items():
            d = p.to_dict()
            if name.startswith(prefix) and (name.endswith(suffix) if suffix else True):
                out.append(d)
        return out

    def services(self) -> list[dict]:
        from pgbctl.local import services

        return [s.to_dict() | {"name": n} for n, s in services.status().items()]
