"""Pub/Sub benchmarks on the local emulator, and ``pgbctl simulate`` pacing.

Rows:

* ``pubsub.publish`` / ``pubsub.pull`` -- msg/s for ZTF-sized (~70 KB) alerts through the
  emulator with the official clients as :class:`pgbctl.clients.Clients` builds them:
  publish N (default batching) and wait for every future; then synchronous pull (1000 per
  request) + acknowledge until all N are back.
* ``simulate.rate_100`` -- ``pgbctl simulate --rate 100 --duration 30s --synthetic``.
* ``simulate.rate_1000`` -- ``pgbctl simulate --rate 1000 --duration 30s --from-dir D --loop``
  on a folder of pre-generated ZTF-sized alerts (synthetic generation is ~4 ms/alert, too
  slow to feed 1000/s).
* ``simulate.rate_1000_batched`` -- the same with ``--batch-every 0.1s``.

The simulate runs use the real CLI (``pgbctl create --testid bench`` first, ``pgbctl delete``
after) in a temporary PGBCTL home. The achieved rate is measured on the broker side: a
subscription of ours on the instance's ``alerts`` topic is drained after each run and the
emulator's ``publish_time`` of the first and last message give the span (the CLI's own summary
is quoted in the note). Target: within 5 % of the requested rate. A run that overruns its
duration by more than 50 % is interrupted (SIGINT) by a wall-clock guard, and says so.

The instance's own subscriptions on ``alerts`` are deleted after ``create`` (nothing consumes
them here, and they would keep every message in the emulator's heap).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from bench import create_instance, alert_packets, cli, cycle, local_home, log, pgbctl_exe, row

TESTID = "bench"


def _drain(clients, sub: str, *, expect: int | None = None, idle: float = 2.0) -> list[float]:
    """Pull + ack everything of ``sub``; the messages' publish times (epoch seconds)."""
    times: list[float] = []
    last = time.monotonic()
    while True:
        r = clients.subscriber.pull(request={"subscription": sub, "max_messages": 1000,
                                             "return_immediately": True}, timeout=30)
        got = r.received_messages
        if got:
            clients.subscriber.acknowledge(request={"subscription": sub, "ack_ids": [m.ack_id for m in got]})
            times += [m.message.publish_time.timestamp() for m in got]
            last = time.monotonic()
            if expect is not None and len(times) >= expect:
                return times
        elif time.monotonic() - last > idle:
            return times
        else:
            time.sleep(0.05)


def _publish_pull(clients, packets: list[bytes], n: int, label: str) -> list[dict]:
    topic, sub = clients.topic_path("bench-raw"), clients.subscription_path("bench-raw")
    clients.publisher.create_topic(name=topic)
    clients.subscriber.create_subscription(name=sub, topic=topic, ack_deadline_seconds=120)
    kb = sum(len(p) for p in cycle(packets, n)) / n / 1024
    log(f"pubsub: publish {n} x {kb:.0f} KB")
    t0 = time.perf_counter()
    futures = [clients.publisher.publish(topic, p, seq=str(i)) for i, p in enumerate(cycle(packets, n))]
    for f in futures:
        f.result(timeout=300)
    pub = n / (time.perf_counter() - t0)
    log(f"pubsub: pull {n}")
    t0 = time.perf_counter()
    got = len(_drain(clients, sub, expect=n, idle=10.0))
    pull = got / (time.perf_counter() - t0)
    out = [
        row("pubsub.publish", pub, "msg/s", None,
            f"{n} msgs of {kb:.0f} KB ({label}), default batching, all futures awaited; {pub * kb / 1024:.0f} MB/s"),
        row("pubsub.pull", pull, "msg/s", None,
            f"sync pull (1000/request) + ack of {got}/{n}; {pull * kb / 1024:.0f} MB/s"),
    ]
    clients.subscriber.delete_subscription(subscription=sub)
    clients.publisher.delete_topic(topic=topic)
    return out


def _simulate_once(home: Path, clients, topic: str, name: str, rate: float, duration: float,
                   source_args: list[str]) -> dict:
    sub = clients.subscription_path(f"bench-count-{name.rsplit('.', 1)[-1].replace('_', '-')}")
    clients.subscriber.create_subscription(name=sub, topic=topic, ack_deadline_seconds=600)
    argv = [*pgbctl_exe(), "--json", "--testid", TESTID, "simulate", "--rate", f"{rate:g}",
            "--duration", f"{duration:g}s", *source_args]
    env = dict(os.environ, PGBCTL_HOME=str(home), PGBCTL_BACKEND="local")
    guard = duration * 1.5 + 20  # start-up (imports, first synthetic chunk) + 50 % overrun
    log(f"pubsub: {' '.join(argv[1 + argv.index('simulate'):])} (guard {guard:.0f}s)")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    interrupted = False
    try:
        out, err = p.communicate(timeout=guard)
    except subprocess.TimeoutExpired:
        interrupted = True
        p.send_signal(signal.SIGINT)
        try:
            out, err = p.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
    wall = time.monotonic() - t0
    summary = None
    if p.returncode == 0:
        try:
            import json

            summary = json.loads(out)
        except ValueError:
            summary = None
    times = sorted(_drain(clients, sub))
    clients.subscriber.delete_subscription(subscription=sub)
    n = len(times)
    span = times[-1] - times[0] if n > 1 else 0.0
    achieved = (n - 1) / span if span > 0 else None
    notes = [f"{n} published in {span:.1f}s (broker publish times)"]
    if achieved:
        notes.append(f"{100 * achieved / rate:.0f} % of requested")
    if summary:
        notes.append(f"CLI: {summary.get('achieved_rate_per_s')}/s over {summary.get('elapsed_s')}s")
    if interrupted:
        notes.append(f"did not stop at --duration {duration:g}s: interrupted after {wall:.0f}s")
    elif p.returncode != 0:
        tail = " ".join((err or out or "").strip().splitlines()[-2:])[:200]
        notes.append(f"CLI exit {p.returncode}: {tail}")
    lo, hi = 0.95 * rate, 1.05 * rate
    return row(name, achieved, "msg/s", f"{lo:g}..{hi:g}", "; ".join(notes), requested=rate,
               published=n, wall_s=round(wall, 1), interrupted=interrupted)


def _simulate(home: Path, clients, duration: float) -> list[dict]:
    from pgbctl import naming, synth

    log("pubsub: pgbctl create --testid bench")
    create_note = create_instance(TESTID, home=home)
    out = []
    try:
        inst = naming.Instance("ztf", TESTID, clients.project)
        for stub, t in naming.SUBSCRIPTION_TOPIC.items():
            if t == "alerts":
                try:
                    clients.subscriber.delete_subscription(subscription=clients.subscription_path(inst.subscription(stub)))
                except Exception:  # noqa: BLE001 - already gone
                    pass
        topic = clients.topic_path(inst.topic("alerts"))
        files = home / "bench-alerts"
        log("pubsub: pre-generating 300 ZTF-sized alerts for --from-dir")
        synth.write_dir(files, 300, seed=11, cutout_bytes=20_000)
        for name, rate, args in (
            ("simulate.rate_100", 100.0, ["--synthetic"]),
            ("simulate.rate_1000", 1000.0, ["--from-dir", str(files), "--loop"]),
            ("simulate.rate_1000_batched", 1000.0, ["--from-dir", str(files), "--loop", "--batch-every", "0.1s"]),
        ):
            out.append(_simulate_once(home, clients, topic, name, rate, duration, args))
        if create_note and out:
            out[0]["note"] += f"; {create_note}"
    finally:
        log("pubsub: pgbctl delete --testid bench")
        cli(["delete", "--testid", TESTID, "--yes"], home=home, check=False)
    return out


def _java_opts(duration: float) -> str | None:
    """Up to ``duration`` x 1000/s x 70 KB stay in the emulator until drained (2 GB for 30 s):
    pgbctl's default heap (when it has one big enough) or 3 GB."""
    import re

    from pgbctl.local import services

    need = 3 if duration > 10 else 1
    m = re.search(r"-Xmx(\d+)g", os.environ.get("PGBCTL_PUBSUB_JAVA_OPTS")
                  or getattr(services, "DEFAULT_PUBSUB_JAVA_OPTS", ""))
    return None if m and int(m.group(1)) >= need else f"-Xmx{need}g -XX:+ExitOnOutOfMemoryError"


def run(quick: bool) -> list[dict]:
    from pgbctl.clients import Clients
    from pgbctl.local import services

    packets, label = alert_packets()
    n = 2000 if quick else 10_000
    duration = 5.0 if quick else 30.0
    with local_home("pgbctl-bench-pubsub-", pubsub_java_opts=_java_opts(duration)) as home:
        ep = services.endpoints(home)
        clients = Clients.for_backend("local", ep.project, ep)
        try:
            out = _publish_pull(clients, packets, n, label)
            out += _simulate(home, clients, duration)
        finally:
            clients.close()
    return out
