"""pgbctl's Apache Beam jobs.

* :mod:`beam_jobs.common` -- what every job shares: :class:`~beam_jobs.common.DecodeAlert`
  (Pub/Sub message -> alert dict, undecodable packets to a ``dead_letter`` output),
  row validation against a BigQuery schema, the dead-letter sink, pipeline options for
  ``gcp`` (Dataflow) and ``local`` (DirectRunner on the emulators).
* :mod:`beam_jobs.bq_sink` -- alerts -> BigQuery tables ``alerts`` and ``DIASource``.

On ``gcp`` a job runs on Dataflow (``python -m beam_jobs.bq_sink --backend gcp ...``);
locally ``python -m pgbctl.localrun bq-sink ...`` runs the same DoFns either in a fast
micro-batch executor (default) or in the streaming DirectRunner (``--mode direct``).
"""
