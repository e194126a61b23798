"""The event loop lag probe (observe/loop_lag.py) and what the metrics and the status page make of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import generate_latest

from hubcache.observe import loop_lag
from hubcache.observe.loop_lag import PROBE, LoopLag
from hubcache.observe.metrics import Metrics
from hubcache.proxy.interception import Interception


def clock(readings: list[float]) -> Iterator[float]:
    """The given readings, then a clock on which every timer runs on time."""
    yield from readings
    now = readings[-1]
    while True:
        yield now
        now += PROBE
        yield now


async def test_the_probe_notes_how_late_its_timer_ran(monkeypatch, caplog):
    metrics = Metrics(Interception())
    # On time, then woken 300 ms after it was due (the loop was held), then on time again.
    readings = clock([0.0, PROBE, PROBE, 2 * PROBE + 0.3])
    noted: list[float] = []
    three = asyncio.Event()

    def lagged(seconds: float) -> None:
        noted.append(seconds)
        Metrics.loop_lagged(metrics, seconds)
        if len(noted) == 3:
            three.set()

    monkeypatch.setattr(metrics, "loop_lagged", lagged)
    caplog.set_level(logging.DEBUG, logger=loop_lag.__name__)
    probe = LoopLag(metrics, clock=lambda: next(readings))
    probe.running()
    await asyncio.wait_for(three.wait(), timeout=10)
    probe.done()
    assert [round(lag, 6) for lag in noted[:3]] == [0.0, 0.3, 0.0]
    assert metrics.stalls() == (metrics.longest_lag, 1) and round(metrics.longest_lag, 6) == 0.3
    assert [r.message for r in caplog.records] == ["hubcache: event loop stalled: a timer ran 300 ms late"]


def test_the_longest_lag_is_kept_and_lags_over_50_ms_are_counted():
    metrics = Metrics(Interception())
    assert metrics.stalls() == (0.0, 0)
    for lag in (0.01, 0.05, 0.2, 0.07, 0.001):
        metrics.loop_lagged(lag)
    assert metrics.stalls() == (0.2, 2), "50 ms itself is no stall"
    exposed = generate_latest(metrics.registry).decode()
    assert "hubcache_event_loop_lag_max_seconds 0.2" in exposed
    assert 'hubcache_event_loop_lag_seconds_bucket{le="0.05"} 3.0' in exposed
    assert "hubcache_event_loop_lag_seconds_count 5.0" in exposed
