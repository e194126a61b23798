"""Progress bars and sizes for the command line (rich). Bars go to stderr, results to stdout."""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ..units import size

__all__ = ["ByteBar", "LayerBars", "console", "count", "size"]

# Piped output keeps whole digests and names on one line rather than fitting 80 columns.
console = Console(width=None if sys.stdout.isatty() else 250)
_bars = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_bars,
    )


class ByteBar:
    """One bar over a known number of bytes."""

    def __init__(self, description: str, total: int):
        self._progress = _progress()
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> ByteBar:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self._progress.stop()

    def advance(self, n: int) -> None:
        self._progress.advance(self._task, n)


class LayerBars:
    """A bar per blob being fetched, keyed by digest; safe to drive from worker threads."""

    def __init__(self) -> None:
        self._progress = _progress()
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> LayerBars:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        self._progress.stop()

    def start(self, key: str, label: str, total: int) -> None:
        with self._lock:
            self._tasks[key] = self._progress.add_task(label, total=total)

    def advance(self, key: str, n: int) -> None:
        self._progress.advance(self._tasks[key], n)
