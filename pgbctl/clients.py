"""One factory for the official Google Cloud clients, for either backend.

Everything else in pgbctl asks a :class:`Clients` for its clients and never looks at the
backend again::

    c = Clients.for_backend("local", project, endpoints())   # or ("gcp", project)
    c.publisher.publish(c.topic_path("alerts"), data)

``local``: the Pub/Sub clients are built on an insecure gRPC channel to the emulator with
UNLIMITED message sizes.  (With only ``PUBSUB_EMULATOR_HOST`` set, google-cloud-pubsub opens
``grpc.insecure_channel(host)`` with gRPC's default 4 MB receive limit, while the emulator
packs up to 100 messages in one pull response: pulls of ~70 KB alerts fail with
RESOURCE_EXHAUSTED and streaming pull silently delivers nothing.)  Storage and BigQuery
use ``client_options={"api_endpoint": url}`` and anonymous credentials.

``gcp``: application-default credentials, default endpoints, no overrides.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import grpc
    from google.cloud import bigquery, pubsub_v1, storage

    from pgbctl.local.services import Endpoints

BACKENDS = ("gcp", "local")

#: gRPC channel options for the Pub/Sub emulator channel.
EMULATOR_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_http_proxy", 0),  # never route 127.0.0.1 through a proxy
    ("grpc.keepalive_time_ms", 30000),
)


def emulator_channel(host: str) -> "grpc.Channel":
    """An insecure channel to a gRPC emulator with unlimited message sizes."""
    import grpc

    return grpc.insecure_channel(host, options=list(EMULATOR_CHANNEL_OPTIONS))


def local_http_session(pool_size: int = 32, *, service: str | None = None, home: str | None = None):
    """The HTTP session of the local Storage and BigQuery clients: no proxy lookups in the
    environment (``trust_env=False``: requests otherwise scans ``os.environ`` on every
    request -- a third of the client's CPU per object upload -- and must never route
    127.0.0.1 through a proxy anyway) and a connection pool for many worker threads.

    With ``service`` (``storage`` or ``warehouse``) and the local state dir ``home``, the
    session follows the service when it restarts on another port (see :class:`_FollowAdapter`).
    """
    import requests

    s = requests.Session()
    s.trust_env = False
    if service and home:
        adapter = _follow_adapter(service, home, pool_connections=4, pool_maxsize=pool_size)
    else:
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


def _follow_adapter(service: str, home: str, **kw):
    import requests

    class _FollowAdapter(requests.adapters.HTTPAdapter):
        """Sends to a local service's CURRENT address.

        The storage emulator restarts whenever its bucket-notification topic changes (another
        instance's ``pgbctl create``/``delete``), normally on the same port but on another
        one when the old port cannot be bound yet. A client built for the old address would
        then fail forever; this adapter, on a connection error, reads the service's address
        from the local state dir and, if it moved, sends the request there (a request that
        could not connect never reached the old server, so resending is safe) -- and every
        later request too.
        """

        def __init__(self, **akw):
            super().__init__(**akw)
            self._orig: str | None = None  # the address the client builds its URLs with
            self._target: str | None = None  # where the service is now, when it moved

        def _current(self) -> str | None:
            from urllib.parse import urlsplit

            from pgbctl.local import services

            try:
                ep = services.endpoints(home)
            except Exception:  # noqa: BLE001 - services down: report the original error
                return None
            return urlsplit(ep.storage_url if service == "storage" else ep.bigquery_url).netloc

        def send(self, request, **skw):
            from urllib.parse import urlsplit, urlunsplit

            parts = urlsplit(request.url)
            if self._orig is None:
                self._orig = parts.netloc
            if self._target and parts.netloc == self._orig:
                request.url = urlunsplit(parts._replace(netloc=self._target))
                parts = urlsplit(request.url)
            try:
                return super().send(request, **skw)
            except requests.exceptions.ConnectionError as e:
                # only "could not connect" is safe to resend (nothing reached the server)
                if not isinstance(e, requests.exceptions.ConnectTimeout) and "refused" not in str(e).lower():
                    raise
                now = self._current()
                if not now or now == parts.netloc:
                    raise
                self._target = now
                request.url = urlunsplit(parts._replace(netloc=now))
                return super().send(request, **skw)

    return _FollowAdapter(**kw)


class Clients:
    """Lazily built official clients for one project on one backend.

    Properties: ``publisher`` (pubsub_v1.PublisherClient), ``subscriber``
    (pubsub_v1.SubscriberClient), ``storage`` (storage.Client), ``bigquery``
    (bigquery.Client), ``project``.  Thread-safe construction; call :meth:`close` to release
    the gRPC channels.
    """

    def __init__(self, backend: str, project: str, endpoints: "Endpoints | None" = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if not project:
            raise ValueError("project is required")
        if backend == "local" and endpoints is None:
            from pgbctl.local.services import endpoints as _endpoints

            endpoints = _endpoints()
        self.backend = backend
        self._project = project
        self.endpoints = endpoints if backend == "local" else None
        self._lock = threading.RLock()
        self._cache: dict[str, Any] = {}

    def _get(self, name: str, make) -> Any:
        c = self._cache.get(name)
        if c is None:
            with self._lock:
                c = self._cache.get(name)
                if c is None:
                    c = self._cache[name] = make()
        return c

    @classmethod
    def for_backend(cls, backend: str, project: str, endpoints: "Endpoints | None" = None) -> "Clients":
        """``endpoints`` is used only for ``local`` (default: the running local services)."""
        return cls(backend, project, endpoints)

    @property
    def project(self) -> str:
        return self._project

    @property
    def is_local(self) -> bool:
        return self.backend == "local"

    # ------------------------------------------------------------------ Pub/Sub

    @property
    def publisher(self) -> "pubsub_v1.PublisherClient":
        return self._get("publisher", self._make_publisher)

    def _make_publisher(self) -> "pubsub_v1.PublisherClient":
        from google.cloud import pubsub_v1

        if not self.is_local:
            return pubsub_v1.PublisherClient()
        from google.pubsub_v1.services.publisher.transports.grpc import PublisherGrpcTransport

        host = self.endpoints.pubsub_host
        transport = PublisherGrpcTransport(host=host, channel=emulator_channel(host))
        return pubsub_v1.PublisherClient(transport=transport)

    @property
    def subscriber(self) -> "pubsub_v1.SubscriberClient":
        return self._get("subscriber", self._make_subscriber)

    def _make_subscriber(self) -> "pubsub_v1.SubscriberClient":
        from google.cloud import pubsub_v1

        if not self.is_local:
            return pubsub_v1.SubscriberClient()
        from google.pubsub_v1.services.subscriber.transports.grpc import SubscriberGrpcTransport

        host = self.endpoints.pubsub_host
        transport = SubscriberGrpcTransport(host=host, channel=emulator_channel(host))
        return pubsub_v1.SubscriberClient(transport=transport)

    def topic_path(self, name: str) -> str:
        """``projects/<project>/topics/<name>`` (a full path is returned unchanged)."""
        return name if name.startswith("projects/") else f"projects/{self._project}/topics/{name}"

    def subscription_path(self, name: str) -> str:
        """``projects/<project>/subscriptions/<name>`` (a full path is returned unchanged)."""
        return name if name.startswith("projects/") else f"projects/{self._project}/subscriptions/{name}"

    # ------------------------------------------------------------------ Storage / BigQuery

    @property
    def storage(self) -> "storage.Client":
        return self._get("storage", self._make_storage)

    def _make_storage(self) -> "storage.Client":
        from google.cloud import storage

        if not self.is_local:
            return storage.Client(project=self._project)
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=self._project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoints.storage_url},
                              _http=local_http_session(service="storage", home=self.endpoints.home))

    @property
    def bigquery(self) -> "bigquery.Client":
        return self._get("bigquery", self._make_bigquery)

    def _make_bigquery(self) -> "bigquery.Client":
        from google.cloud import bigquery

        if not self.is_local:
            return bigquery.Client(project=self._project)
        from google.auth.credentials import AnonymousCredentials

        return bigquery.Client(project=self._project, credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": self.endpoints.bigquery_url},
                               _http=local_http_session(service="warehouse", home=self.endpoints.home))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close the clients that were built (their gRPC channels / HTTP sessions)."""
        for name in ("publisher", "subscriber"):
            c = self._cache.pop(name, None)
            if c is not None:
                try:
                    if name == "subscriber":
                        c.close()
                    else:
                        c.stop()  # flush pending batches
                        c.transport.close()
                except Exception:  # noqa: BLE001 - best effort on shutdown
                    pass
        for name in ("storage", "bigquery"):
            c = self._cache.pop(name, None)
            if c is not None and hasattr(c, "close"):
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass

    def __enter__(self) -> "Clients":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = f", endpoints={self.endpoints!r}" if self.endpoints else ""
        return f"Clients(backend={self.backend!r}, project={self._project!r}{where})"


# ---------------------------------------------------------------------- acknowledgement helpers


def ack_all(subscriber, subscription: str, ack_ids: list[str], chunk: int = 500) -> None:
    """Acknowledge ``ack_ids`` in requests of at most ``chunk`` ids."""
    for i in range(0, len(ack_ids), chunk):
        subscriber.acknowledge(request={"subscription": subscription, "ack_ids": ack_ids[i : i + chunk]})


def nack_all(subscriber, subscription: str, ack_ids: list[str], chunk: int = 500) -> None:
    """Hand messages back now (ack deadline 0). Failures are only logged: the messages come
    back after their ack deadline anyway."""
    import logging

    for i in range(0, len(ack_ids), chunk):
        try:
            subscriber.modify_ack_deadline(request={"subscription": subscription, "ack_ids": ack_ids[i : i + chunk],
                                                    "ack_deadline_seconds": 0})
        except Exception as e:  # noqa: BLE001
            logging.getLogger("pgbctl.clients").warning(
                "nack failed (%s); messages return after their ack deadline", e)
