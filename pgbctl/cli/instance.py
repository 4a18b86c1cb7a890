"""``pgbctl create | delete | status``: the life of one broker instance."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn

from pgbctl import broker_files
from pgbctl.backends import get_backend
from pgbctl.backends.base import schema_json
from pgbctl.backends.bqschema import table_schemas
from pgbctl.cli.common import (
    Backend,
    DryRun,
    Json,
    Out,
    Project,
    Survey,
    Testid,
    Verbose,
    Yes,
    backend_errors,
    confirm,
    err,
    opts,
    table,
)
from pgbctl.plan import Plan, desired, plan, plan_delete


def render_plan(p: Plan, title: str):
    rows = [[c.symbol, c.action.value, c.resource.kind.value, c.resource.name, c.reason] for c in p.changes]
    s = p.summary()
    t = table(
        f"{title}: {s['create']} to create, {s['update']} to update, {s['replace']} to replace, "
        f"{s['delete']} to delete, {s['unchanged']} unchanged",
        ["", "action", "kind", "name", "why"],
        rows,
    )
    return t


def _apply(o, out: Out, backend, the_plan: Plan, inst, **kw) -> None:
    with backend_errors(out, "apply"), Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            console=err, transient=True, disable=out.json) as bar:
        task = bar.add_task("applying", total=len(the_plan))
        results = backend.apply(the_plan, inst, progress=lambda ch: bar.advance(task), **kw)
    failed = [m for _, m in results if m]
    if failed:
        raise out.fail(failed[0])


def create(
    ctx: typer.Context,
    dry_run: DryRun = False,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    yes: Yes = None,
    verbose: Verbose = 0,
) -> None:
    """Create (or bring up to date) every resource of an instance. Re-running changes nothing."""
    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, yes=yes, verbose=verbose)
    out = Out(o)
    inst = o.instance
    try:
        files = broker_files.collect(inst.survey)
        schemas = table_schemas(inst.survey)
    except FileNotFoundError as e:
        raise out.fail(str(e), 2) from None
    be = get_backend(o.backend, o.project)
    with backend_errors(out, "observe"):
        want = desired(inst, table_schemas=schemas, broker_files=files)
        the_plan = plan(want, be.observe(inst))
    if the_plan or out.json:
        out.data({"instance": inst.label, "dry_run": dry_run, **the_plan.as_dict()},
                 lambda _: render_plan(the_plan, f"plan for {inst.label} on {o.backend}"))
    if dry_run or not the_plan:
        if not the_plan:
            out.info(f"{inst.label}: up to date, nothing to do")
        return
    if o.backend == "gcp" and not confirm(o, f"Apply {len(the_plan)} changes to project {o.project}?"):
        raise out.fail("not confirmed (use --yes)", 1)
    _apply(o, out, be, the_plan, inst, broker_files=files, table_schemas=schema_json(inst.survey))
    out.info(f"[green]created[/green] {inst.label}: {len(the_plan)} changes applied")


def delete(
    ctx: typer.Context,
    dry_run: DryRun = False,
    delete_production: Annotated[
        Optional[str],
        typer.Option("--delete-production", metavar="SURVEY",
                     help="Required to delete a PRODUCTION instance (no testid): repeat the survey name."),
    ] = None,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    yes: Yes = None,
    verbose: Verbose = 0,
) -> None:
    """Delete every resource of an instance. Production is refused without --delete-production."""
    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, yes=yes, verbose=verbose)
    out = Out(o)
    inst = o.instance
    if inst.production and not dry_run:
        if delete_production != inst.survey:
            raise out.fail(
                f"refusing to delete the PRODUCTION {inst.survey} broker (no --testid given). "
                f"If you really mean it, add --delete-production {inst.survey}",
                2,
            )
        err.print(f"[bold red]!!! DELETING THE PRODUCTION {inst.survey.upper()} BROKER IN {o.project} !!![/bold red]")
    be = get_backend(o.backend, o.project)
    with backend_errors(out, "observe"):
        the_plan = plan_delete(be.observe(inst))
    if the_plan or out.json:
        out.data({"instance": inst.label, "dry_run": dry_run, **the_plan.as_dict()},
                 lambda _: render_plan(the_plan, f"delete plan for {inst.label} on {o.backend}"))
    if dry_run or not the_plan:
        if not the_plan:
            out.info(f"{inst.label}: nothing to delete")
        return
    if (o.backend == "gcp" or inst.production) and not confirm(
        o, f"Delete {len(the_plan)} resources of {inst.label}?"
    ):
        raise out.fail("not confirmed (use --yes)", 1)
    _apply(o, out, be, the_plan, inst)
    out.info(f"[green]deleted[/green] {inst.label}: {len(the_plan)} resources removed")


def render_status(st: dict):
    from rich.console import Group

    rows = []
    for r in st["resources"]:
        d = r["detail"]
        count = ", ".join(f"{k}={'?' if v is None else v}" for k, v in d.items())
        rows.append([r["kind"], r["name"], "yes" if r["exists"] else "[red]no[/red]", count])
    inst = st["instance"]
    parts = [table(f"{inst['survey']}/{inst['testid'] or '(production)'} on {st['backend']} ({inst['project']})",
                   ["kind", "name", "exists", "counts"], rows)]
    if st.get("processes"):
        parts.append(table("processes", ["name", "state", "pid", "uptime", "log"],
                           [[p.get("name"), p.get("state") or ("running" if p.get("running") else "exited"),
                             p.get("pid"), f"{p['uptime']:.0f}s" if p.get("uptime") else "", p.get("log")]
                            for p in st["processes"]]))
    if st.get("services"):
        parts.append(table("local services", ["service", "pid", "port", "healthy"],
                           [[s.get("name"), s.get("pid"), s.get("port"), s.get("healthy")] for s in st["services"]]))
    if st.get("reconcile"):
        parts.append(table("alerts per stage", ["stage", "count"], [[k, v] for k, v in st["reconcile"].items()]))
    return Group(*parts)


def status(
    ctx: typer.Context,
    no_count: Annotated[bool, typer.Option("--no-count", help="Skip counting waiting messages.")] = False,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """Every resource of an instance: exists, messages waiting, objects, rows; running processes."""
    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, verbose=verbose)
    out = Out(o)
    be = get_backend(o.backend, o.project)
    with backend_errors(out, "status"):
        st = be.status(o.instance, count_waiting=not no_count).as_dict()
    st["reconcile"] = reconcile(st)
    out.data(st, render_status)
    missing = sum(1 for r in st["resources"] if not r["exists"])
    if missing == len(st["resources"]):
        raise out.fail(f"{o.instance.label} does not exist on {o.backend} (project {o.project}); "
                       f"run `pgbctl create` to create it")
    if missing:
        out.warn(f"{missing} resources missing; run `pgbctl create` to create them")


def reconcile(st: dict) -> dict:
    """Alerts per stage, from the status counts: what a night operator checks first."""
    out: dict[str, object] = {}

    def find(kind: str, contains: str, key: str):
        for r in st["resources"]:
            if r["kind"] == kind and contains in r["name"] and key in r["detail"]:
                return r["detail"][key]
        return None

    out["alerts published (alerts-counter)"] = find("subscription", "-alerts-counter", "waiting")
    out["alerts in reservoir"] = find("subscription", "-alerts-reservoir", "waiting")
    out["objects in alert_avros bucket"] = find("bucket", "-alert_avros", "objects")
    out["rows in alerts table"] = find("table", ".alerts", "rows")
    out["rows in DIASource table"] = find("table", ".DIASource", "rows")
    out["alerts_pure published"] = find("subscription", "-alerts_pure-counter", "waiting")
    out["exgalac_trans published"] = find("subscription", "-exgalac_trans-counter", "waiting")
    out["salt2 fits published"] = find("subscription", "-salt2-counter", "waiting")
    out["rows in salt2 table"] = find("table", ".salt2", "rows")
    out["light-curve PNGs in sncosmo bucket"] = find("bucket", "-sncosmo", "objects")
    out["dead letters"] = find("subscription", "-dead_letter-counter", "waiting")
    return {k: v for k, v in out.items() if v is not None}
