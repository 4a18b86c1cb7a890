"""Shared CLI pieces: the global options (declared once), the context, and the one output helper.

Every option here can be given before the sub-command (``pgbctl --testid x status``), after it
(``pgbctl status --testid x``), or through its environment variable; the innermost wins.
Data goes to stdout (a Rich table, or JSON with ``--json``); messages go to stderr.
Exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from pgbctl import naming

# ---- option types, declared once ------------------------------------------------------------


def _check_testid(value: Optional[str]) -> Optional[str]:
    try:
        return naming.validate_testid(value) if value is not None else None
    except naming.NameError_ as e:
        raise typer.BadParameter(str(e)) from None


def _check_survey(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    try:
        return naming.validate_survey(value)
    except naming.NameError_ as e:
        raise typer.BadParameter(str(e)) from None


def _check_project(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    try:
        return naming.validate_project(value)
    except naming.NameError_ as e:
        raise typer.BadParameter(str(e)) from None


def _check_backend(value: Optional[str]) -> Optional[str]:
    if value is not None and value not in ("local", "gcp"):
        raise typer.BadParameter(f"backend must be 'local' or 'gcp', not {value!r}")
    return value


Backend = Annotated[
    Optional[str],
    typer.Option("--backend", envvar="PGBCTL_BACKEND", callback=_check_backend,
                 help="Where the broker runs: local (emulators on this machine) or gcp.",
                 show_default="local", rich_help_panel="Instance"),
]
Project = Annotated[
    Optional[str],
    typer.Option("--project", envvar="PGBCTL_PROJECT", callback=_check_project,
                 help="GCP project id (local: any valid id).", show_default="pgbctl-local",
                 rich_help_panel="Instance"),
]
Survey = Annotated[
    Optional[str],
    typer.Option("--survey", envvar="PGBCTL_SURVEY", callback=_check_survey,
                 help="Survey whose alerts the instance handles.", show_default="ztf",
                 rich_help_panel="Instance"),
]
Testid = Annotated[
    Optional[str],
    typer.Option("--testid", envvar="PGBCTL_TESTID", callback=_check_testid,
                 help="Test instance id (lowercase letters/digits). Omit for production.",
                 rich_help_panel="Instance"),
]
Json = Annotated[
    Optional[bool],
    typer.Option("--json/--no-json", envvar="PGBCTL_JSON", help="Print data as JSON.",
                 show_default=False, rich_help_panel="Output"),
]
Yes = Annotated[
    Optional[bool],
    typer.Option("--yes/--no-yes", "-y", envvar="PGBCTL_YES",
                 help="Do not ask for confirmation.", show_default=False,
                 rich_help_panel="Output"),
]
Verbose = Annotated[
    int, typer.Option("--verbose", "-v", count=True, help="More log output (repeatable).",
                      rich_help_panel="Output"),
]
DryRun = Annotated[
    bool, typer.Option("--dry-run", help="Show the plan and change nothing."),
]


# ---- context ------------------------------------------------------------------------------


@dataclass
class Opts:
    backend: str = "local"
    project: str = "pgbctl-local"
    survey: str = "ztf"
    testid: Optional[str] = None
    json: bool = False
    yes: bool = False
    verbose: int = 0

    @property
    def instance(self) -> naming.Instance:
        return naming.Instance(self.survey, self.testid, self.project)


def root_opts(ctx: typer.Context) -> Opts:
    obj = ctx.find_root().obj
    if not isinstance(obj, Opts):
        obj = Opts()
        ctx.find_root().obj = obj
    return obj


def opts(ctx: typer.Context, **given: Any) -> Opts:
    """Merge command-level options over the root ones (None = not given)."""
    base = root_opts(ctx)
    merged = Opts(**{**base.__dict__})
    for k, v in given.items():
        if v is not None and k != "verbose":
            setattr(merged, k, v)
    if given.get("verbose"):
        merged.verbose = max(merged.verbose, given["verbose"])
    if merged.testid is not None and merged.testid == "":
        merged.testid = None
    return merged


# ---- output ---------------------------------------------------------------------------------

err = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=False)


class Out:
    """The one output helper: data on stdout as a table or JSON, messages on stderr."""

    def __init__(self, o: Opts):
        self.json = o.json
        self.verbose = o.verbose

    def data(self, obj: Any, render: Callable[[Any], Any] | None = None) -> None:
        if self.json or render is None:
            sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
            sys.stdout.flush()
        else:
            out_console.print(render(obj))

    def info(self, msg: str) -> None:
        err.print(msg)

    def debug(self, msg: str) -> None:
        if self.verbose:
            err.print(f"[dim]{msg}[/dim]")

    def warn(self, msg: str) -> None:
        err.print(f"[yellow]warning:[/yellow] {msg}")

    def spinner(self, msg: str):
        """A spinner on stderr while something slow happens (``with out.spinner(...) as sp``;
        ``sp`` is None with --json, else a Rich Status with ``update``)."""
        import contextlib

        return contextlib.nullcontext() if self.json else err.status(msg)

    def fail(self, msg: str, code: int = 1) -> "typer.Exit":
        err.print(f"[red]error:[/red] {msg}")
        return typer.Exit(code)


class backend_errors:
    """Turn backend and Google API errors into one line on stderr and exit code 1."""

    def __init__(self, out: "Out", what: str = ""):
        self.out, self.what = out, what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit)):
            return False
        from google.api_core.exceptions import GoogleAPIError
        from google.auth.exceptions import GoogleAuthError

        from pgbctl.backends.base import BackendError

        if isinstance(exc, (BackendError, GoogleAPIError, GoogleAuthError, ConnectionError)):
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            prefix = f"{self.what}: " if self.what else ""
            raise self.out.fail(f"{prefix}{first}") from None
        return False


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["" if v is None else str(v) for v in r])
    return t


def confirm(o: Opts, question: str, *, dangerous: bool = False) -> bool:
    """Ask unless ``--yes``; without a terminal, refuse (never assume yes)."""
    if o.yes and not dangerous:
        return True
    if not sys.stdin.isatty():
        return bool(o.yes)
    return typer.confirm(question, default=False, err=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
