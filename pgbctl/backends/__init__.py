"""Backends: ``local`` (emulators on this machine, the default) and ``gcp``. One interface."""

from __future__ import annotations

from pgbctl.backends.base import Backend, BackendError, Status


def get_backend(name: str, project: str) -> Backend:
    if name == "local":
        from pgbctl.backends.local import LocalBackend

        return LocalBackend(project)
    if name == "gcp":
        from pgbctl.backends.gcp import GcpBackend

        return GcpBackend(project)
    raise BackendError(f"unknown backend {name!r} (choose local or gcp)")


__all__ = ["Backend", "BackendError", "Status", "get_backend"]
