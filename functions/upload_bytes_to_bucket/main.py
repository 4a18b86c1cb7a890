"""Cloud Function: archive each alert of the ``alerts`` topic as an Avro file in ``alert_avros``.

Deployed with a Pub/Sub trigger on ``<survey>-alerts[-<testid>]``; locally the same handler runs
in a supervised subscriber process (``pgbctl.functions_runtime``). Configuration comes from
the environment: ``PGBCTL_SURVEY``, ``PGBCTL_TESTID`` (empty = production), ``GCP_PROJECT``.
"""

import base64

import functions_framework

from pgbctl import archive
from pgbctl.functions_runtime import FunctionEnv

ENV = FunctionEnv.from_environ()


@functions_framework.cloud_event
def run(cloud_event) -> str:
    msg = cloud_event.data["message"]
    outcome = archive.handle(
        base64.b64decode(msg.get("data", "")),
        msg.get("attributes") or {},
        msg.get("messageId", ""),
        smap=ENV.schema_map,
        storage=ENV.clients.storage,
        bucket=ENV.inst.bucket("alert_avros"),
        dead_letter_bucket=ENV.inst.bucket("dead_letter"),
        publisher=ENV.clients.publisher,
        dead_letter_topic=ENV.topic_path("dead_letter"),
    )
    return outcome.status
