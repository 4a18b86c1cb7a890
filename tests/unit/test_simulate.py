"""The publish loop of `pgbctl simulate`: pacing, acks only after success, failures surfaced."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from pgbctl import simulate as sim


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, dt: float) -> None:
        self.t += dt


def done_future(exc: Exception | None = None) -> Future:
    f: Future = Future()
    f.set_exception(exc) if exc else f.set_result("msg-id")
    return f


def messages(n: int, log: list):
    for i in range(n):
        yield sim.Message(f"m{i}".encode(), {"i": str(i)},
                          ack=lambda i=i: log.append(("ack", i)), nack=lambda i=i: log.append(("nack", i)))


@pytest.mark.parametrize("text,per_s", [("100", 100), ("6000/min", 100), ("360000/h", 100), ("ztf-live-max", 200),
                                        ("max", float("inf"))])
def test_parse_rate(text, per_s):
    assert sim.parse_rate(text).per_second == pytest.approx(per_s)


@pytest.mark.parametrize("bad", ["fast", "-1", "0", "10/week", ""])
def test_parse_rate_rejects(bad):
    with pytest.raises(sim.RateError):
        sim.parse_rate(bad)


def test_paced_run_publishes_count_at_rate_and_acks_after_success():
    clock, log, sent = FakeClock(), [], []

    def publish(m):
        sent.append((clock(), m.data))
        return done_future()

    s = sim.run(messages(50, log), publish, sim.parse_rate("10"), count=20, clock=clock, sleep=clock.sleep)
    assert s.published == 20 and s.failed == 0
    assert [t for t, _ in sent] == pytest.approx([i / 10 for i in range(20)])
    assert log == [("ack", i) for i in range(20)]
    assert s.achieved_rate == pytest.approx(20 / 1.9, rel=0.01)


def test_failed_publish_is_counted_reported_and_nacked():
    clock, log = FakeClock(), []
    calls = iter(range(100))

    def publish(m):
        return done_future(RuntimeError("quota exceeded\nsecond line") if next(calls) == 2 else None)

    s = sim.run(messages(5, log), publish, sim.parse_rate("max"), count=5, clock=clock, sleep=clock.sleep)
    assert (s.published, s.failed) == (4, 1)
    assert s.errors == ["RuntimeError: quota exceeded"]
    assert ("nack", 2) in log and ("ack", 2) not in log


def test_publish_raising_synchronously_is_a_failure_not_a_crash():
    clock, log = FakeClock(), []

    def publish(m):
        raise ValueError("attribute too long")

    s = sim.run(messages(3, log), publish, sim.parse_rate("max"), count=3, clock=clock, sleep=clock.sleep)
    assert (s.published, s.failed) == (0, 3) and log == [("nack", i) for i in range(3)]


def test_leave_in_source_nacks_even_successes():
    clock, log = FakeClock(), []
    s = sim.run(messages(3, log), lambda m: done_future(), sim.parse_rate("max"), count=3,
                clock=clock, sleep=clock.sleep, leave_in_source=True)
    assert s.published == 3 and log == [("nack", i) for i in range(3)]


def test_pending_futures_are_awaited_before_returning():
    clock, log, futs = FakeClock(), [], []

    def publish(m):
        f: Future = Future()
        futs.append(f)
        if len(futs) == 3:  # resolve everything only when the last one is submitted ...
            import threading

            threading.Timer(0.05, lambda: [x.set_result("id") for x in futs]).start()
        return f

    s = sim.run(messages(3, log), publish, sim.parse_rate("max"), count=3, clock=clock, sleep=clock.sleep)
    assert s.published == 3 and len(log) == 3  # ... and run() still counted and acked them all


def test_exhausted_source_stops_early():
    clock, log = FakeClock(), []
    s = sim.run(messages(4, log), lambda m: done_future(), sim.parse_rate("100"), count=10,
                clock=clock, sleep=clock.sleep)
    assert s.published == 4 and s.exhausted


def test_duration_bounds_the_run():
    clock, log = FakeClock(), []
    s = sim.run(messages(1000, log), lambda m: done_future(), sim.parse_rate("10"), duration=2.0,
                clock=clock, sleep=clock.sleep)
    assert s.published == 20


def test_batch_every_delivers_bursts():
    r = sim.parse_rate("100").with_batch_every(5)
    assert (r.batch, r.every) == (500, 5)
    assert list(sim.schedule(r, 1200, None)) == [(0, 500), (5, 500), (10, 200)]


def test_synthetic_source_has_unique_ids_and_kafka_attributes():
    from pgbctl.schemamap import load

    smap = load("ztf")
    it = sim.synthetic(smap, seed=3, chunk=4)
    msgs = [next(it) for _ in range(10)]  # spans three generator blocks
    ids = {(m.attributes["objectId"], m.attributes["candid"]) for m in msgs}
    assert len(ids) == 10
    assert all(m.attributes["kafka.topic"].startswith("ztf_") for m in msgs)


def test_from_dir_loop_reuses_files_and_flags_corrupt(tmp_path):
    from pgbctl import synth
    from pgbctl.schemamap import load

    smap = load("ztf")
    synth.write_dir(tmp_path, 2, seed=1)
    (tmp_path / "zzz.avro").write_bytes(b"not avro")
    it = sim.from_dir(tmp_path, smap, loop=True)
    msgs = [next(it) for _ in range(6)]
    assert [m.data for m in msgs[:3]] == [m.data for m in msgs[3:]]
    bad = [m for m in msgs if "pgbctl.decode_error" in m.attributes]
    assert len(bad) == 2  # still sent: the broker dead-letters it with the reason
