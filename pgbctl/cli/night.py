"""``pgbctl night start | end | status``: run an instance's night (archive function + Beam jobs).

Locally the night's processes are supervised processes of the local backend (see
:mod:`pgbctl.night`); on gcp, starting Dataflow jobs and deploying the function is not
implemented yet (one-line error, exit 1).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Optional

import typer

from pgbctl import night as nightlib
from pgbctl.backends import BackendError, get_backend
from pgbctl.cli.common import Backend, DryRun, Json, Out, Project, Survey, Testid, Verbose, err, opts, table

app = typer.Typer(help="Start and end an instance's night: the archive function and the Beam jobs.",
                  no_args_is_help=True)

Jobs = Annotated[
    Optional[str],
    typer.Option("--jobs", metavar="JOB[,JOB...]",
                 help="Beam jobs to run besides the archive function: "
                      + ", ".join(nightlib.job_names()) + " or none. Default: every job whose code is in "
                      "this checkout (now: " + (", ".join(nightlib.default_jobs()) or "none") + ")."),
]
KafkaTopic = Annotated[
    str,
    typer.Option("--kafka-topic", metavar="TOPIC",
                 help="Survey Kafka topic for the consumer; NONE = no consumer (feed alerts with "
                      "`pgbctl simulate`). Only NONE is supported on the local backend."),
]
_TOPIC_RX = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def _gcp_not_implemented(out: Out, what: str) -> typer.Exit:
    return out.fail(f"night {what} is not yet implemented on gcp (Dataflow launch / function deploy); "
                    "use --backend local", 1)


def _render_start(d: dict):
    rows = [[p["name"], p.get("action", ""), p["subscription"], p.get("pid") or "", p.get("log") or ""]
            for p in d["processes"]]
    title = f"night of {d['instance']}" + (" (dry run: nothing started)" if d["dry_run"] else "")
    return table(title, ["process", "action", "drains", "pid", "log"], rows)


def _render_end(d: dict):
    rows = []
    for p in d["processes"]:
        c = p.get("counts") or {}
        shown = ", ".join(f"{k}={v}" for k, v in c.items()
                          if k not in ("job", "mode", "instance", "function", "subscription", "seconds",
                                       "wall_seconds", "write_method") and v is not None)
        rows.append([p["name"], p.get("result", p.get("action", "")), shown])
    title = f"night of {d['instance']} ended" if not d["dry_run"] else f"night of {d['instance']} (dry run: nothing stopped)"
    if not d["dry_run"]:
        title += f": {'drained' if d.get('drained') else 'NOT drained'} after {d.get('waited_s', 0)}s"
    return table(title, ["process", "result", "final counts"], rows)


def _local_checks(be, inst, specs: list[nightlib.ProcessSpec], jobs: list[str]) -> list[str]:
    """Resources the night needs that are missing (empty list = ready)."""
    from pgbctl.plan import RKind

    have = {r.key for r in be.observe(inst, objects=False)}
    need = [(RKind.subscription, s.subscription) for s in specs]
    need += [(RKind.bucket, inst.bucket(b)) for b in ("alert_avros", "dead_letter")]
    need += [(RKind.topic, inst.topic("dead_letter"))]
    if "bq-sink" in jobs:
        need += [(RKind.table, inst.table(t)) for t in ("alerts", "DIASource")]
    return [f"{k.value} {n}" for k, n in need if (k, n) not in have]


def _point_notifications(be, inst, out: Out) -> None:
    """fake-gcs-server notifies ONE topic: make it this instance's ``alert_avros`` topic."""
    from pgbctl.plan import Action, Change, RKind, resource

    if be.observe_notifications(inst, [inst.bucket("alert_avros")]):
        return
    out.warn(f"the local storage service's bucket notifications go elsewhere; pointing them at "
             f"{inst.topic('alert_avros')} (one instance at a time locally)")
    be.apply_notification(Change(Action.create, resource(
        RKind.notification, inst.bucket("alert_avros"), topic=inst.topic("alert_avros"),
        event_types="OBJECT_FINALIZE", payload_format="JSON_API_V1")))


@app.command()
def start(
    ctx: typer.Context,
    kafka_topic: KafkaTopic = "NONE",
    jobs: Jobs = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for every process to be ready.")] = 120,
    dry_run: DryRun = False,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """Start the night: the archive function and the Beam jobs, as supervised processes. Idempotent."""
    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, verbose=verbose)
    out = Out(o)
    inst = o.instance
    if not _TOPIC_RX.match(kafka_topic):
        raise out.fail(f"invalid --kafka-topic {kafka_topic!r}: letters, digits, '.', '_' and '-' only", 2)
    try:
        job_list = nightlib.parse_jobs(jobs)
    except ValueError as e:
        raise out.fail(str(e), 2) from None
    if o.backend == "gcp":
        raise _gcp_not_implemented(out, "start")
    if kafka_topic.upper() != "NONE":
        raise out.fail(f"--kafka-topic {kafka_topic}: the Kafka consumer does not run on the local backend; "
                       "use --kafka-topic NONE and feed alerts with `pgbctl simulate`", 1)
    from pgbctl import paths

    home = paths.state_dir()
    specs = nightlib.night_processes(inst, job_list, home=home)
    if dry_run:
        from pgbctl.local import services

        running = services.list_processes()
        procs = [{"name": s.name, "component": s.component, "subscription": s.subscription,
                  "action": "already-running" if (running.get(s.name) and running[s.name].running) else "would-start",
                  "pid": None, "log": None, "argv": list(s.argv)} for s in specs]
        out.data({"instance": inst.label, "backend": o.backend, "dry_run": True, "jobs": job_list,
                  "processes": procs}, _render_start)
        return
    be = get_backend(o.backend, o.project)
    try:
        missing = _local_checks(be, inst, specs, job_list)
        if missing:
            raise out.fail(f"{inst.label} is missing {len(missing)} resource(s) the night needs "
                           f"(first: {missing[0]}); run `pgbctl create"
                           f"{' --testid ' + inst.testid if inst.testid else ''}` first")
        _point_notifications(be, inst, out)
        from pgbctl.local import services

        base_env = services.endpoints(project=inst.project).env(inst.project)
        specs = nightlib.night_processes(inst, job_list, home=home, base_env=base_env)
        t0 = time.monotonic()
        with out.spinner(f"starting the night of {inst.label}"):
            results = nightlib.start(specs)
    except typer.Exit:
        raise
    except Exception as e:  # noqa: BLE001 - one line for the user (the tail of a log with -v)
        msg = str(e) if isinstance(e, (BackendError, nightlib.NightError)) else f"{type(e).__name__}: {e}"
        first, _, rest = msg.partition("\n")
        if rest and o.verbose:
            err.print(rest)
        raise out.fail(first) from None
    out.data({"instance": inst.label, "backend": o.backend, "dry_run": False, "jobs": job_list,
              "processes": results}, _render_start)
    n = sum(1 for r in results if r["action"] == "started")
    out.info(f"[green]night started[/green] for {inst.label}: {n} started, {len(results) - n} already running "
             f"({time.monotonic() - t0:.1f}s); end it with `pgbctl night end"
             f"{' --testid ' + inst.testid if inst.testid else ''}`")


@app.command()
def end(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait for the subscriptions to drain.")] = 300,
    no_drain: Annotated[bool, typer.Option("--no-drain", help="Stop at once (messages in hand are finished; "
                                                             "waiting ones stay in the subscriptions).")] = False,
    dry_run: DryRun = False,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """Drain and stop the night: wait until the subscriptions are empty and the processes idle,
    then SIGTERM them and report their final counts. Idempotent."""
    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, verbose=verbose)
    out = Out(o)
    inst = o.instance
    if o.backend == "gcp":
        raise _gcp_not_implemented(out, "end")
    procs = nightlib.running(inst)
    if dry_run:
        rows = [{"name": n, "action": "would-stop" if p["running"] else "stale-state", "result": "",
                 "subscription": "", "counts": None} for n, p in sorted(procs.items())]
        out.data({"instance": inst.label, "dry_run": True, "processes": rows}, _render_end)
        return
    if not procs:
        out.data({"instance": inst.label, "dry_run": False, "drained": True, "waited_s": 0, "waiting": {},
                  "processes": []}, _render_end)
        out.info(f"{inst.label}: no night process running, nothing to stop")
        return
    be = get_backend(o.backend, o.project)

    def progress(msg: str) -> None:
        if sp is not None:
            sp.update(f"ending the night of {inst.label}: {msg}")

    try:
        with out.spinner(f"ending the night of {inst.label}") as sp:
            res = nightlib.end(inst, be.count_waiting, timeout=timeout, drain_first=not no_drain,
                               on_progress=progress)
    except Exception as e:  # noqa: BLE001 - one line for the user
        msg = str(e) if isinstance(e, BackendError) else f"{type(e).__name__}: {e}"
        raise out.fail(msg.splitlines()[0] if msg else type(e).__name__) from None
    d = {"instance": inst.label, "dry_run": False, **res}
    out.data(d, _render_end)
    if not res["drained"] and not no_drain:
        left = ", ".join(f"{s}={n}" for s, n in res["waiting"].items() if n)
        raise out.fail(f"stopped before the night drained: {res['why']}"
                       + (f"; left: {left} (they stay in their subscriptions for the next night)" if left else ""))
    out.info(f"[green]night ended[/green] for {inst.label}: {len(res['processes'])} processes stopped")


@app.command()
def status(
    ctx: typer.Context,
    backend: Backend = None,
    project: Project = None,
    survey: Survey = None,
    testid: Testid = None,
    json_: Json = None,
    verbose: Verbose = 0,
) -> None:
    """The night's processes: state, messages in hand, live counts (from their status files)."""
    from pgbctl import paths, procstatus

    o = opts(ctx, backend=backend, project=project, survey=survey, testid=testid, json=json_, verbose=verbose)
    out = Out(o)
    inst = o.instance
    if o.backend == "gcp":
        raise _gcp_not_implemented(out, "status")
    rows = []
    for name, p in sorted(nightlib.running(inst).items()):
        st = procstatus.read(nightlib.status_dir(paths.state_dir()) / f"{name}.status.json") or {}
        rows.append({"name": name, "running": p["running"], "pid": p["pid"], "restarts": p["restarts"],
                     "in_flight": st.get("in_flight"), "counts": st.get("counts"), "log": p["log"]})
    out.data({"instance": inst.label, "processes": rows},
             lambda d: table(f"night of {d['instance']}", ["process", "running", "pid", "restarts", "in hand", "counts"],
                             [[r["name"], r["running"], r["pid"], r["restarts"], r["in_flight"],
                               ", ".join(f"{k}={v}" for k, v in (r["counts"] or {}).items() if v is not None)]
                              for r in d["processes"]]))
