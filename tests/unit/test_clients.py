"""Unit tests for pgbctl.clients (no emulators: an in-process gRPC server stands in for Pub/Sub)."""

from __future__ import annotations

import os
from concurrent import futures

import grpc
import pytest
from google.api_core import exceptions as gexc
from google.auth.credentials import AnonymousCredentials
from google.pubsub_v1.types import PubsubMessage, PullRequest, PullResponse, ReceivedMessage

from pgbctl import clients as clients_mod
from pgbctl.clients import EMULATOR_CHANNEL_OPTIONS, Clients
from pgbctl.local.services import Endpoints

N_MESSAGES, MESSAGE_BYTES = 20, 300_000  # 6 MB in one pull response: > gRPC's 4 MB default


def _endpoints(pubsub_host: str = "127.0.0.1:1") -> Endpoints:
    return Endpoints(pubsub_host=pubsub_host, storage_url="http://127.0.0.1:2",
                     bigquery_url="http://127.0.0.1:3", project="proj-x")


@pytest.fixture(scope="module")
def fake_pubsub():
    """A gRPC server answering Subscriber/Pull with 20 x 300 KB messages in ONE response,
    as the real emulator does (it packs up to 100 messages per response)."""
    payload = os.urandom(MESSAGE_BYTES)

    def pull(request: PullRequest, context) -> PullResponse:
        return PullResponse(received_messages=[
            ReceivedMessage(ack_id=f"a{i}", message=PubsubMessage(data=payload, message_id=str(i)))
            for i in range(min(N_MESSAGES, request.max_messages or N_MESSAGES))
        ])

    handler = grpc.method_handlers_generic_handler("google.pubsub.v1.Subscriber", {
        "Pull": grpc.unary_unary_rpc_method_handler(
            pull, request_deserializer=PullRequest.deserialize, response_serializer=PullResponse.serialize),
    })
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_unknown_backend_and_missing_project():
    with pytest.raises(ValueError):
        Clients.for_backend("aws", "p", _endpoints())
    with pytest.raises(ValueError):
        Clients.for_backend("local", "", _endpoints())


def test_paths():
    c = Clients.for_backend("local", "proj-x", _endpoints())
    assert c.project == "proj-x"
    assert c.topic_path("alerts") == "projects/proj-x/topics/alerts"
    assert c.subscription_path("alerts-sub") == "projects/proj-x/subscriptions/alerts-sub"
    assert c.topic_path("projects/other/topics/t") == "projects/other/topics/t"
    assert c.subscription_path("projects/other/subscriptions/s") == "projects/other/subscriptions/s"


def test_local_pubsub_channels_are_unlimited(monkeypatch):
    seen = []
    real = grpc.insecure_channel

    def recording(target, options=None, *a, **kw):
        ch = real(target, options=options, *a, **kw)
        seen.append((target, dict(options or []), ch))
        return ch

    monkeypatch.setattr(grpc, "insecure_channel", recording)
    c = Clients.for_backend("local", "proj-x", _endpoints("127.0.0.1:4321"))
    pub, sub = c.publisher, c.subscriber
    assert len(seen) == 2
    for target, opts, ch in seen:
        assert target == "127.0.0.1:4321"
        assert opts["grpc.max_receive_message_length"] == -1
        assert opts["grpc.max_send_message_length"] == -1
    assert pub.transport.grpc_channel is seen[0][2]
    assert sub.transport.grpc_channel is seen[1][2]
    assert dict(EMULATOR_CHANNEL_OPTIONS)["grpc.max_receive_message_length"] == -1
    c.close()


def test_clients_are_cached_and_closed():
    c = Clients.for_backend("local", "proj-x", _endpoints())
    assert c.publisher is c.publisher and c.subscriber is c.subscriber
    assert c.storage is c.storage and c.bigquery is c.bigquery
    first = c.subscriber
    c.close()
    assert c.subscriber is not first
    c.close()


def test_large_pull_works_with_clients(fake_pubsub):
    c = Clients.for_backend("local", "proj-x", _endpoints(fake_pubsub))
    resp = c.subscriber.pull(subscription=c.subscription_path("big-sub"), max_messages=100, timeout=10)
    assert len(resp.received_messages) == N_MESSAGES
    assert all(len(m.message.data) == MESSAGE_BYTES for m in resp.received_messages)
    c.close()


def test_large_pull_fails_with_default_emulator_client(fake_pubsub, monkeypatch):
    """The control: what Clients avoids (plain PUBSUB_EMULATOR_HOST -> 4 MB receive limit)."""
    from google.api_core.retry import Retry
    from google.cloud import pubsub_v1

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", fake_pubsub)
    sub = pubsub_v1.SubscriberClient()
    with pytest.raises((gexc.ResourceExhausted, gexc.RetryError)):
        sub.pull(subscription="projects/p/subscriptions/big-sub", max_messages=100, timeout=5,
                 retry=Retry(timeout=3))
    sub.close()


def test_local_clients_ignore_emulator_env(fake_pubsub, monkeypatch):
    """PUBSUB_EMULATOR_HOST in the environment must not replace our unlimited channel."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")  # nothing listens there
    c = Clients.for_backend("local", "proj-x", _endpoints(fake_pubsub))
    resp = c.subscriber.pull(subscription=c.subscription_path("big-sub"), max_messages=100, timeout=10)
    assert len(resp.received_messages) == N_MESSAGES
    c.close()


def test_local_storage_and_bigquery_endpoints():
    c = Clients.for_backend("local", "proj-x", _endpoints())
    assert c.storage.project == "proj-x"
    assert c.storage._connection.API_BASE_URL == "http://127.0.0.1:2"
    assert isinstance(c.storage._credentials, AnonymousCredentials)
    assert c.bigquery.project == "proj-x"
    assert c.bigquery._connection.API_BASE_URL == "http://127.0.0.1:3"
    assert isinstance(c.bigquery._credentials, AnonymousCredentials)


def test_gcp_backend_uses_defaults(monkeypatch):
    import google.auth

    for var in ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "BIGQUERY_EMULATOR_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "proj-g"))
    c = Clients.for_backend("gcp", "proj-g", _endpoints())
    assert c.endpoints is None
    assert c.publisher.transport._host == "pubsub.googleapis.com:443"
    assert c.subscriber.transport._host == "pubsub.googleapis.com:443"
    assert c.storage._connection.API_BASE_URL == "https://storage.googleapis.com"
    assert c.bigquery._connection.API_BASE_URL == "https://bigquery.googleapis.com"
    c.close()


def test_local_without_endpoints_reads_state(monkeypatch, tmp_path):
    from pgbctl.local.services import LocalServicesError

    monkeypatch.setenv("PGBCTL_HOME", str(tmp_path))
    with pytest.raises(LocalServicesError):
        Clients.for_backend("local", "p")
    assert clients_mod.BACKENDS == ("gcp", "local")
