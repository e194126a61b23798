"""How late mitmproxy's event loop runs a timer: how long a request that arrives now can wait
behind work on the loop (a blocking call, a slow hook, a thread holding the GIL). A probe sleeps
PROBE seconds at a time and notes how much later than due it woke, into the metrics (the longest
lag since start, a histogram of every lag); a lag over STALL also goes to the debug log.
A stall of d seconds shows as a lag between d - PROBE and d: the probe may have been asleep for
up to PROBE of it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from .metrics import STALL, Metrics

logger = logging.getLogger(__name__)

PROBE = 0.02  # seconds between wake-ups: 50 a second, under 1 % of a core


class LoopLag:
    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self._clock = clock
        self._task: asyncio.Task | None = None

    def running(self) -> None:
        self._task = asyncio.create_task(self._probe())

    def done(self) -> None:
        if self._task:
            self._task.cancel()

    async def _probe(self) -> None:
        while True:
            due = self._clock() + PROBE
            await asyncio.sleep(PROBE)
            lag = max(0.0, self._clock() - due)  # asyncio may run a timer a hair early
            self.metrics.loop_lagged(lag)
            if lag > STALL:
                logger.debug(f"hubcache: event loop stalled: a timer ran {lag * 1000:.0f} ms late")
