"""``pgbctl simulate``: feed an instance's ``alerts`` topic at a controlled rate."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pgbctl import simulate as sim
from pgbctl.backends import BackendError, get_backend
from pgbctl.cli.common import Backend, Json, Out, Project, Survey, Testid, Verbose, Yes, backend_errors, err, opts, table


def simulate(
    ctx: typer.Context,
    rate: Annotated[str, typer.Option(help="Alerts per second (100), N/min, N/h, N/night, or a preset: "
                                            + ", ".join(sim.PRESETS))] = "100",
    count: Annotated[Optional[int], typer.Option(min=1, help="Stop after N alerts.")] = None,
    duration: Annotated[Optional[str], typer.Option(help="Stop after this long (30s, 5m, 2h).")] = None,
    once: Annotated[Optional[int], typer.Option(min=1, help="Publish N alerts at once and stop.")] = None,
    batch_every: Annotated[Optional[str], typer.Option(help="Deliver the rate as one batch every T (e.g. 5s).")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Generate alerts (deterministic).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic generator.")] = 0,
    from_dir: Annotated[Optional[Path], typer.Option("--from-dir", exists=True, file_okay=False,
                                                     help="Publish the .avro files of a folder.")] = None,
    from_subscription: Annotated[Optional[str], typer.Option(
        "--from-subscription", help="Pull from this subscription (default: the survey's production reservoir).")] = None,
    closed_loop: Annotated[bool, typer.Option("--closed-loop", help="Pull from the instance's own reservoir.")] = False,
    nack: Annotated[bool, typer.Option("--nack", help="Leave pulled messages in the source subscription.")] = False,
    loop: Annotated[bool, typer.Option("--loop", help="With --from-dir: repeat the files until count/duration.")] = False,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    yes: Yes = None,
    verbose: Verbose = 0,
) -> None:
    """Publish alerts to the instance's [bold]alerts[/bold] topic at a controlled rate (bypasses the consumer)."""
    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, yes=yes, verbose=verbose)
    out = Out(o)
    inst = o.instance
    from pgbctl import schemamap

    smap = schemamap.load(inst.survey)
    try:
        r = sim.parse_rate(rate)
        if once:
            r, count = sim.Rate(once, 0.0, "once"), once
        if batch_every:
            r = r.with_batch_every(sim.parse_duration(batch_every))
        dur = sim.parse_duration(duration) if duration else None
    except sim.RateError as e:
        raise typer.BadParameter(str(e)) from None
    chosen = [bool(synthetic), from_dir is not None, bool(from_subscription) or closed_loop]
    if sum(chosen) > 1:
        raise typer.BadParameter("choose one source: --synthetic, --from-dir or --from-subscription/--closed-loop")
    if count is None and dur is None and (synthetic or loop):
        raise typer.BadParameter("an endless source needs --count, --duration or --once")

    be = get_backend(o.backend, o.project)
    try:
        with backend_errors(out, "connect"):
            clients = be.clients
        if synthetic:
            source, label = sim.synthetic(smap, seed=seed), f"synthetic(seed={seed})"
        elif from_dir is not None:
            source, label = sim.from_dir(from_dir, smap, loop=loop), str(from_dir)
        else:
            sub = inst.subscription("alerts-reservoir") if closed_loop else (
                from_subscription or type(inst)(inst.survey, None, inst.project).subscription("alerts-reservoir"))
            path = sub if sub.startswith("projects/") else be.subscription_path(sub)
            source, label = sim.from_subscription(clients.subscriber, path), path
    except (BackendError, FileNotFoundError) as e:
        raise out.fail(str(e)) from None

    topic_path = be.topic_path(inst.topic("alerts"))
    publisher = clients.publisher

    def publish(m: sim.Message):
        return publisher.publish(topic_path, m.data, **m.attributes)

    total = count
    with Progress(TextColumn("[bold]simulate[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rate]:.1f}/s"), TimeElapsedColumn(),
                  console=err, disable=out.json, transient=False) as bar:
        task = bar.add_task("publish", total=total, rate=0.0)

        def on_batch(s: sim.Summary) -> None:
            bar.update(task, completed=s.published + s.failed, rate=s.achieved_rate)

        summary = sim.run(source, publish, r, count=count, duration=dur, on_batch=on_batch, leave_in_source=nack)
    summary.source = label
    d = {"topic": inst.topic("alerts"), **summary.as_dict()}
    out.data(d, lambda d: table("simulate summary", ["", ""], [[k, v] for k, v in d.items() if k != "errors"]))
    if summary.failed:
        raise out.fail(f"{summary.failed} publishes failed; first: {summary.errors[0]}")


COMMANDS = [simulate]
app = None
