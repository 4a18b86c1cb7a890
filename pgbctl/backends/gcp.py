"""Real Google Cloud through the official client libraries (default credentials)."""

from __future__ import annotations

from google.api_core import exceptions as gexc

from pgbctl.backends.base import Backend, BackendError
from pgbctl.naming import Instance
from pgbctl.plan import Action, Change, RKind, Resource, resource


class GcpBackend(Backend):
    name = "gcp"

    def __init__(self, project: str, location: str = "us-central1"):
        super().__init__(project)
        self.location = location

    def ensure_ready(self) -> None:
        import google.auth
        from google.auth.exceptions import GoogleAuthError

        try:
            google.auth.default()
        except GoogleAuthError:
            raise BackendError(
                f"no Google Cloud credentials for project {self.project!r}: run "
                "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
            ) from None

    def make_clients(self):
        from pgbctl.clients import Clients

        try:
            return Clients.for_backend("gcp", self.project)
        except Exception as e:  # google.auth.exceptions.DefaultCredentialsError and friends
            raise BackendError(
                f"cannot reach Google Cloud for project {self.project!r}: {e}. "
                "Run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS."
            ) from None

    def bucket_location(self) -> str | None:
        return self.location

    def observe_notifications(self, inst: Instance, buckets: list[str]) -> list[Resource]:
        out = []
        target = inst.bucket("alert_avros")
        if target in buckets:
            for n in self.clients.storage.bucket(target).list_notifications():
                out.append(
                    resource(
                        RKind.notification,
                        target,
                        topic=n.topic_name,
                        event_types=",".join(n.event_types or []),
                        payload_format=n.payload_format,
                    )
                )
        return out

    def apply_notification(self, change: Change) -> None:
        bucket = self.clients.storage.bucket(change.resource.name)
        spec = change.resource.specd()
        if change.action in (Action.delete, Action.update, Action.replace):
            for n in bucket.list_notifications():
                try:
                    n.delete()
                except gexc.NotFound:
                    pass
        if change.action is not Action.delete:
            bucket.notification(
                topic_name=spec["topic"],
                topic_project=self.project,
                event_types=spec["event_types"].split(","),
                payload_format=spec["payload_format"],
            ).create()

    def count_waiting(self, subscription: str) -> int | None:
        """Cloud Monitoring's num_undelivered_messages (latest point in the last 10 min)."""
        try:
            import time

            from google.cloud import monitoring_v3

            client = monitoring_v3.MetricServiceClient()
            now = int(time.time())
            interval = monitoring_v3.TimeInterval(
                {"end_time": {"seconds": now}, "start_time": {"seconds": now - 600}}
            )
            series = client.list_time_series(
                request={
                    "name": f"projects/{self.project}",
                    "filter": 'metric.type="pubsub.googleapis.com/subscription/num_undelivered_messages" '
                    f'AND resource.labels.subscription_id="{subscription}"',
                    "interval": interval,
                    "view": monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL,
                }
            )
            for s in series:
                return int(s.points[0].value.int64_value)
            return 0
        except Exception:  # noqa: BLE001 - monitoring is best-effort in status
            return None
