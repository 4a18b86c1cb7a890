"""``pgbctl query``: standard SQL on the instance's warehouse."""

from __future__ import annotations

from typing import Annotated

import typer

from pgbctl.backends import BackendError, get_backend
from pgbctl.cli.common import Backend, Json, Out, Project, Survey, Testid, Verbose, opts, table
from pgbctl.sql import SqlError, qualify


def query(
    ctx: typer.Context,
    sql: Annotated[str, typer.Argument(help="Standard SQL; unqualified table names mean the instance's dataset.")],
    max_rows: Annotated[int, typer.Option(min=1, help="Print at most this many rows.")] = 1000,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """Run SQL on the instance's warehouse (BigQuery on gcp, the local warehouse locally)."""
    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, verbose=verbose)
    out = Out(o)
    inst = o.instance
    try:
        text = qualify(sql, inst.project, inst.dataset)
    except SqlError as e:
        raise out.fail(str(e), 2) from None
    out.debug(f"SQL: {text}")
    be = get_backend(o.backend, o.project)
    try:
        result = be.clients.bigquery.query(text).result(max_results=max_rows)
        names = [f.name for f in result.schema]
        rows = [dict(zip(names, r.values())) for r in result]
    except BackendError as e:
        raise out.fail(str(e)) from None
    except Exception as e:  # noqa: BLE001 - the warehouse's error, one line
        raise out.fail(f"query failed: {str(e).splitlines()[0]}") from None
    out.data(rows, lambda rs: table(f"{len(rs)} rows", names, [[r[n] for n in names] for r in rs]))


COMMANDS = [query]
