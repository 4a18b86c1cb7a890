"""The local backend's machinery: emulators on 127.0.0.1 and a small process supervisor.

See :mod:`pgbctl.local.services` for the services (Pub/Sub emulator, fake-gcs-server,
bqemulator) and :mod:`pgbctl.local.procs` for the pid/state-file discipline.
"""

from pgbctl.local.services import (
    DEFAULT_PROJECT,
    KEEP,
    SERVICES,
    Endpoints,
    LocalServicesError,
    PrerequisiteMissing,
    ProcessInfo,
    ServiceInfo,
    down,
    endpoints,
    list_processes,
    start_process,
    status,
    stop_process,
    up,
)

__all__ = [
    "DEFAULT_PROJECT", "KEEP", "SERVICES", "Endpoints", "LocalServicesError", "PrerequisiteMissing",
    "ProcessInfo", "ServiceInfo", "down", "endpoints", "list_processes", "start_process", "status",
    "stop_process", "up",
]
