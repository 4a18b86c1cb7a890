"""Consumer simulator: feed an instance's ``alerts`` topic at a controlled rate.

Pure parts (rate parsing, the pacing schedule, attribute synthesis) are separate from the loop
that publishes, so they are tested as data. Sources yield :class:`Message` values; the publish
loop acks a source message only after its publish succeeded.
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

__all__ = [
    "RateError",
    "Rate",
    "parse_rate",
    "parse_duration",
    "PRESETS",
    "Message",
    "schedule",
    "Summary",
    "run",
]

NIGHT_SECONDS = 10 * 3600  # an observing night, for N/night rates and the ZTF preset


class RateError(ValueError):
    """A --rate, --duration or --batch-every value could not be read."""


@dataclass(frozen=True)
class Rate:
    """``batch`` alerts every ``every`` seconds (a smooth rate has batch 1)."""

    batch: int
    every: float
    name: str = ""

    @property
    def per_second(self) -> float:
        return self.batch / self.every if self.every > 0 else float("inf")

    def with_batch_every(self, seconds: float) -> "Rate":
        """Same average rate, delivered as one batch every ``seconds``."""
        n = max(1, round(self.per_second * seconds))
        return Rate(n, seconds, self.name)


PRESETS: dict[str, Rate] = {
    "ztf-active-avg": Rate(1, NIGHT_SECONDS / 300_000, "ztf-active-avg"),  # 300,000 per 10 h
    "ztf-live-max": Rate(1, 1 / 200, "ztf-live-max"),  # 200/s
    "lsst-avg": Rate(10_000, 35.0, "lsst-avg"),  # 10,000 per 35 s visit
    "lsst-burst": Rate(40_000, 0.0, "lsst-burst"),  # 40,000 at once
}

_UNITS = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hr": 3600.0, "night": NIGHT_SECONDS}


def parse_duration(text: str) -> float:
    """``30``, ``30s``, ``5m``/``5min``, ``2h``, ``1night`` → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", str(text).lower())
    if not m or (m.group(2) and m.group(2) not in _UNITS):
        raise RateError(f"cannot read duration {text!r}: use e.g. 30s, 5m, 2h, 1night")
    return float(m.group(1)) * _UNITS.get(m.group(2) or "s", 1.0)


def parse_rate(text: str) -> Rate:
    """``100`` (per second), ``N/s``, ``N/min``, ``N/h``, ``N/night``, or a preset name."""
    t = str(text).strip().lower()
    if t in PRESETS:
        return PRESETS[t]
    if t in ("max", "unlimited"):
        return Rate(500, 0.0, "max")  # as fast as the backend takes them, 500 per batch
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:/\s*([a-z]+))?", t)
    if not m:
        raise RateError(
            f"cannot read rate {text!r}: use N (per second), N/min, N/h, N/night, max or one of "
            + ", ".join(PRESETS)
        )
    n = float(m.group(1))
    unit = m.group(2) or "s"
    if unit not in _UNITS:
        raise RateError(f"unknown rate unit {unit!r} in {text!r}: use s, min, h or night")
    if n <= 0:
        raise RateError(f"rate must be positive, got {text!r}")
    return Rate(1, _UNITS[unit] / n, t)


def schedule(rate: Rate, count: int | None, duration: float | None) -> Iterator[tuple[float, int]]:
    """(offset in seconds from start, batch size) for each batch; stops at ``count`` alerts or
    after ``duration`` seconds, whichever comes first (``None`` = unbounded)."""
    sent = 0
    k = 0
    while True:
        t = k * rate.every
        if duration is not None and t >= duration and k > 0:
            return
        n = rate.batch if count is None else min(rate.batch, count - sent)
        if n <= 0:
            return
        yield t, n
        sent += n
        k += 1
        if rate.every == 0 and count is None:
            return  # a burst without a count is one batch


@dataclass
class Message:
    data: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    ack: Callable[[], None] | None = None  # call after a successful publish
    nack: Callable[[], None] | None = None  # call when the publish failed (or --nack)


@dataclass
class Summary:
    requested_rate: float
    published: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    source: str = ""
    exhausted: bool = False

    @property
    def achieved_rate(self) -> float:
        return self.published / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "requested_rate_per_s": round(self.requested_rate, 3),
            "achieved_rate_per_s": round(self.achieved_rate, 3),
            "published": self.published,
            "failed": self.failed,
            "elapsed_s": round(self.elapsed_s, 3),
            "source_exhausted": self.exhausted,
            "errors": self.errors[:20],
        }


def run(
    source: Iterable[Message],
    publish: Callable[[Message], Any],
    rate: Rate,
    *,
    count: int | None = None,
    duration: float | None = None,
    on_batch: Callable[[Summary], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    leave_in_source: bool = False,
    max_in_flight: int = 2000,
    result_timeout: float = 60.0,
    report_every: float = 0.1,
) -> Summary:
    """Publish from ``source`` following the pacing ``schedule``, without waiting for each
    publish to finish (so the rate is not capped by the round trip).

    ``publish(message)`` returns a future (``add_done_callback``, ``result``, ``exception``),
    as ``PublisherClient.publish`` does; a future that raises is a failed publish. A source
    message is acked only after its own publish succeeded; failed ones are nacked (with
    ``leave_in_source`` every message is nacked, so the source keeps it). At most
    ``max_in_flight`` publishes are outstanding; the run ends when every one has finished.
    """
    it = iter(source)
    summ = Summary(requested_rate=rate.per_second)
    lock = threading.Lock()
    in_flight: deque = deque()

    def done(msg: Message, fut) -> None:
        try:
            exc = fut.exception(timeout=0)
        except Exception as e:  # noqa: BLE001 - a cancelled or broken future is a failure too
            exc = e
        with lock:
            if exc is None:
                summ.published += 1
                cb = msg.nack if leave_in_source else msg.ack
            else:
                summ.failed += 1
                summ.errors.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
                cb = msg.nack
        if cb:
            cb()

    def settle(fut, msg) -> None:
        try:
            fut.result(timeout=result_timeout)
        except Exception:  # noqa: BLE001 - counted by the callback
            pass

    start = clock()
    last_report = start
    try:
        for offset, n in schedule(rate, count, duration):
            wait = start + offset - clock()
            if wait > 0:
                sleep(wait)
            for _ in range(n):
                try:
                    msg = next(it)
                except StopIteration:
                    summ.exhausted = True
                    break
                try:
                    fut = publish(msg)
                except Exception as e:  # noqa: BLE001 - e.g. an attribute the API refuses
                    with lock:
                        summ.failed += 1
                        summ.errors.append(f"{type(e).__name__}: {e}".splitlines()[0])
                    if msg.nack:
                        msg.nack()
                    continue
                fut.add_done_callback(lambda f, m=msg: done(m, f))
                in_flight.append((fut, msg))
                while len(in_flight) > max_in_flight:
                    settle(*in_flight.popleft())
                while in_flight and in_flight[0][0].done():
                    in_flight.popleft()
            now = clock()
            summ.elapsed_s = now - start
            if on_batch and now - last_report >= report_every:
                last_report = now
                on_batch(summ)
            if summ.exhausted:
                break
        while in_flight:
            settle(*in_flight.popleft())
    finally:
        close = getattr(it, "close", None)
        if close:
            close()  # sources flush their pending acks
    summ.elapsed_s = max(clock() - start, summ.elapsed_s)
    if on_batch:
        on_batch(summ)
    return summ


# ---- sources ----------------------------------------------------------------------------------


def attributes_for(alert_bytes: bytes, smap, kafka_topic: str | None = None) -> dict[str, str]:
    """Message attributes for an alert that did not come from Kafka (files, synthetic): the
    ``kafka.*`` metadata the consumer would have set, plus ids for attribute filtering."""
    from pgbctl import codec

    rec = codec.decode(alert_bytes)
    src = rec[smap["source"]]
    attrs = {
        "objectId": str(rec[smap["objectId"]]),
        "candid": str(src[smap["sourceId"]]),
        "kafka.topic": kafka_topic or topic_for_time(src[smap["time"]], smap),
        "kafka.partition": "0",
        "kafka.offset": "-1",
        "kafka.timestamp": str(int(time.time() * 1000)),
    }
    if smap.get("schemavsn") and smap["schemavsn"] in rec:
        attrs["schemavsn"] = str(rec[smap["schemavsn"]])
    return attrs


def topic_for_time(t: float, smap) -> str:
    """The survey's Kafka topic of the night containing time ``t`` (JD or MJD per the map)."""
    from pgbctl import synth

    return synth.kafka_topic_for(t, smap)


def from_dir(path: Path, smap, *, loop: bool = False) -> Iterator[Message]:
    """Avro files of a folder (sorted), as messages; ``loop`` repeats them forever."""
    files = sorted(p for p in Path(path).glob("*.avro") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no .avro files in {path}")
    cache: dict[Path, tuple[bytes, dict]] = {}
    while True:
        for p in files:
            if p not in cache:
                data = p.read_bytes()
                parts = p.name.split(".")
                topic = parts[2] if len(parts) == 4 else None
                try:
                    attrs = attributes_for(data, smap, topic)
                except Exception as e:  # noqa: BLE001 - corrupt files are still sent: the broker dead-letters them
                    attrs = {"kafka.topic": topic or "unknown", "pgbctl.source_file": p.name,
                             "pgbctl.decode_error": str(e)[:200]}
                if not loop:
                    yield Message(data, attrs)
                    continue
                cache[p] = (data, attrs)
            data, attrs = cache[p]
            yield Message(data, dict(attrs))
        if not loop:
            return


def synthetic(smap, *, seed: int = 0, kind: str = "mixed", chunk: int = 500) -> Iterator[Message]:
    """An endless stream of deterministic synthetic alerts."""
    from pgbctl import synth

    for data in synth.stream(seed, survey=smap.survey, chunk=chunk, kind=kind):
        yield Message(data, attributes_for(data, smap))


def from_subscription(subscriber, subscription_path: str, *, batch: int = 100,
                      idle_timeout: float = 5.0) -> Iterator[Message]:
    """Messages pulled from a subscription (a reservoir). Each is acked by the publish loop
    only after its publish succeeded, and nacked (left in the reservoir) otherwise; acks and
    nacks are sent in batches (before each pull and when the source is closed). Stops when
    nothing arrives for ``idle_timeout`` seconds."""
    lock = threading.Lock()
    acks: list[str] = []
    nacks: list[str] = []

    def flush() -> None:
        with lock:
            a, acks[:] = list(acks), []
            n, nacks[:] = list(nacks), []
        from pgbctl.clients import ack_all, nack_all

        ack_all(subscriber, subscription_path, a, chunk=1000)
        nack_all(subscriber, subscription_path, n, chunk=1000)

    idle_since = time.monotonic()
    try:
        while True:
            flush()
            resp = subscriber.pull(
                request={"subscription": subscription_path, "max_messages": batch}, timeout=30
            )
            if not resp.received_messages:
                if time.monotonic() - idle_since > idle_timeout:
                    return
                time.sleep(0.2)
                continue
            idle_since = time.monotonic()
            for rm in resp.received_messages:
                def ack(a=rm.ack_id):
                    with lock:
                        acks.append(a)

                def nack(a=rm.ack_id):
                    with lock:
                        nacks.append(a)

                yield Message(rm.message.data, dict(rm.message.attributes), ack, nack)
    finally:
        flush()
