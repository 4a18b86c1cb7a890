"""The ``pgbctl`` command: one Typer app, one sub-app per noun, shared options declared once."""

from __future__ import annotations

import logging
import sys

import typer

from pgbctl import __version__
from pgbctl.cli import instance
from pgbctl.cli.common import Backend, Json, Opts, Project, Survey, Testid, Verbose, Yes

app = typer.Typer(
    name="pgbctl",
    help="Create, run, test and tear down an astronomical alert broker (local emulators or Google Cloud).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pgbctl {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    ctx: typer.Context,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    yes: Yes = None,
    verbose: Verbose = 0,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Options given here apply to every sub-command (each sub-command accepts them too)."""
    ctx.obj = Opts(
        backend=backend or "local",
        project=project or "pgbctl-local",
        survey=survey or "ztf",
        testid=testid,
        json=bool(json_),
        yes=bool(yes),
        verbose=verbose,
    )
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


app.command()(instance.create)
app.command()(instance.delete)
app.command()(instance.status)


from pgbctl.cli import local_cmd, night, query, simulate  # noqa: E402

app.add_typer(local_cmd.app, name="local")
app.add_typer(night.app, name="night")
for _cmd in (*simulate.COMMANDS, *query.COMMANDS):
    app.command()(_cmd)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
