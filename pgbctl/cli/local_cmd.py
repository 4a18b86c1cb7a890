"""``pgbctl local up | down | status``: the emulators of the local backend.

Commands that need the services (create, status, simulate, night ...) start them implicitly;
these commands are for starting them ahead of time, looking at them, and stopping them.
"""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from pgbctl.cli.common import Json, Out, Project, Verbose, opts, table

app = typer.Typer(help="Start, inspect and stop the local emulators (Pub/Sub, Cloud Storage, BigQuery).",
                  no_args_is_help=True)

Services = Annotated[
    Optional[list[str]],
    typer.Argument(help="Services (pubsub, storage, warehouse); default: all.", show_default=False),
]


def _services(names: Optional[list[str]]):
    from pgbctl.local import services as svc

    if not names:
        return None
    bad = [n for n in names if n not in svc.SERVICES]
    if bad:
        raise typer.BadParameter(f"unknown service {bad[0]!r}; known: {', '.join(svc.SERVICES)}")
    return names


def _render(info: dict) -> object:
    rows = []
    for name, s in info["services"].items():
        state = "healthy" if s["healthy"] else ("running" if s["running"] else "stopped")
        up = f"{s['uptime']:.0f}s" if s.get("uptime") else ""
        rows.append([name, state, s.get("pid") or "", s.get("address") or "", up, s["log"]])
    parts = [table(f"local services ({info['home']})", ["service", "state", "pid", "address", "uptime", "log"], rows)]
    if info.get("processes"):
        prow = [[n, p["state"] or ("running" if p["running"] else "exited"), p.get("pid") or "",
                 p.get("restarts", 0), p["log"]] for n, p in info["processes"].items()]
        parts.append(table("supervised processes", ["process", "state", "pid", "restarts", "log"], prow))
    from rich.console import Group

    return Group(*parts)


def _info() -> dict:
    from pgbctl import paths
    from pgbctl.local import services as svc

    return {
        "home": str(paths.state_dir()),
        "services": {n: s.to_dict() for n, s in svc.status().items()},
        "processes": {n: p.to_dict() for n, p in svc.list_processes().items()},
    }


@app.command()
def up(
    ctx: typer.Context,
    services: Services = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for health.")] = 60,
    project: Project = None,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """Start the local services (reusing healthy ones) and wait until they answer."""
    from pgbctl.local import services as svc

    o = opts(ctx, project=project, json=json_, verbose=verbose)
    out = Out(o)
    names = _services(services)
    t0 = time.monotonic()
    try:
        with out.spinner("starting local services"):
            svc.up(names, project=o.project, timeout=timeout)
    except svc.LocalServicesError as e:
        raise out.fail(str(e).splitlines()[0] + " (see `pgbctl local status` for log paths)")
    out.info(f"local services ready in {time.monotonic() - t0:.1f}s")
    out.data(_info(), _render)


@app.command()
def down(
    ctx: typer.Context,
    services: Services = None,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """Stop supervised processes and the services (data on disk are kept; `make clean` removes them)."""
    from pgbctl.local import services as svc

    o = opts(ctx, json=json_, verbose=verbose)
    out = Out(o)
    res = svc.down(services=_services(services))
    out.data(res, lambda r: table("stopped", ["name", "result"], [[k, v] for k, v in r.items()]))
    if any(v == "stuck" for v in res.values()):
        raise out.fail("some processes could not be stopped: " + ", ".join(k for k, v in res.items() if v == "stuck"))


@app.command("status")
def status_(
    ctx: typer.Context,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """Show each service (state, pid, address, uptime, log) and the supervised processes."""
    o = opts(ctx, json=json_, verbose=verbose)
    Out(o).data(_info(), _render)
