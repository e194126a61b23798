"""The miss journal: one JSON object per line, appended for every request the store could not
answer, with what happened (`outcome`, an `Outcome`) and why (`reason`). Bounded whatever clients
ask: repeats held back, the file rotated by size and age, only the newest rotations kept."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_BYTES = 8 * 1024 * 1024
MAX_AGE = 86400.0
KEEP = 7
REPEAT_SECONDS = 60.0
MAX_REMEMBERED = 10_000  # lines remembered to hold back their repeats


class Outcome(Enum):
    """What became of a request the store could not answer."""

    FILLED = "filled"  # fetched, verified and stored (from upstream, or from the fleet's shared store)
    PASSED = "passed"  # upstream's answer went to the client, not stored (a refusal, a blob with no room)
    STALE = "stale"  # upstream could not say what a tag names now: the cached manifest was served
    FAILED = "failed"  # no answer: upstream unreachable, its body broke off, or it could not be stored
    REJECTED = "rejected"  # upstream's answer did not verify: discarded
    MISSING = "missing"  # answered 404 without asking upstream (offline, or a 404 remembered)
    DENIED = "denied"  # refused by the image policy


def outcome_text(entry: dict) -> str:
    """A journal line's outcome and reason, as an operator reads them."""
    reason = entry.get("reason")
    return f"{entry.get('outcome')}: {reason}" if reason else str(entry.get("outcome"))


class MissJournal:
    def __init__(
        self,
        path: str | os.PathLike,
        *,
        max_bytes: int = MAX_BYTES,
        max_age: float = MAX_AGE,
        keep: int = KEEP,
        repeat_seconds: float = REPEAT_SECONDS,
    ):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age = max_age  # 0: rotated by size only
        self.keep = keep
        self.repeat_seconds = repeat_seconds  # 0: every line is written
        self._lock = threading.Lock()
        self._written: OrderedDict[tuple, float] = OrderedDict()  # line (without time) -> when, oldest first
        self._started: float | None = None  # the time of the current file's first line

    def record(
        self,
        *,
        registry: str,
        repository: str,
        reference: str,
        outcome: Outcome,
        reason: str | None = None,
        digest: str | None = None,
        size: int | None = None,
        kind: str = "",
    ) -> None:
        what = (kind, registry, repository, reference, digest, size, outcome, reason)
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "kind": kind,
            "registry": registry,
            "repository": repository,
            "reference": reference,
            "digest": digest,
            "bytes": size,
            "outcome": outcome.value,
            "reason": reason,
        }
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                if self._repeated(what):
                    return
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    written = os.fstat(fd).st_size
                finally:
                    os.close(fd)
                if written >= self.max_bytes or self._too_old():
                    self._rotate()
        except OSError as e:
            logger.warning(f"miss journal {self.path} not written: {e.strerror}")

    def _repeated(self, what: tuple) -> bool:
        """Whether the same line was written less than `repeat_seconds` ago; if not, it is noted
        as written now."""
        if not self.repeat_seconds:
            return False
        now = time.monotonic()
        last = self._written.get(what)
        if last is not None and now - last < self.repeat_seconds:
            return True
        self._written[what] = now
        self._written.move_to_end(what)
        while len(self._written) > MAX_REMEMBERED:
            self._written.popitem(last=False)
        return False

    def _too_old(self) -> bool:
        if not self.max_age:
            return False
        now = time.time()
        if self._started is None or now - self._started >= self.max_age:
            # Read again: another process sharing the folder may have rotated it meanwhile.
            self._started = self._first_time() or now
        return now - self._started >= self.max_age

    def _first_time(self) -> float | None:
        try:
            with open(self.path, "rb") as f:
                return datetime.fromisoformat(json.loads(f.readline())["time"]).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _rotate(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        try:
            os.rename(self.path, self.path.with_name(f"{self.path.stem}.{stamp}.{os.getpid()}{self.path.suffix}"))
        except FileNotFoundError:
            pass  # another process rotated it first
        self._started = None
        rotations = self.rotations()
        for old in rotations[: max(0, len(rotations) - self.keep)]:
            old.unlink(missing_ok=True)

    def rotations(self) -> list[Path]:
        """The rotated files, oldest first."""
        return sorted(self.path.parent.glob(f"{self.path.stem}.*{self.path.suffix}"))

    def files(self) -> list[Path]:
        """Every file of the journal, oldest first: the rotations, then the current file."""
        return [*self.rotations(), self.path]

    def entries(self) -> list[dict]:
        """Every readable line, oldest first; a torn line (a crash mid-write) is skipped."""
        result = []
        for path in self.files():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue  # rotated away, or never written
            for line in text.splitlines():
                try:
                    result.append(json.loads(line))
                except ValueError:
                    continue
        return result

    def tail(self, size: int) -> list[bytes]:
        """The last whole lines of the journal, about `size` bytes of them, across rotations."""
        lines: list[bytes] = []
        for path in reversed(self.files()):
            try:
                with open(path, "rb") as f:
                    length = os.fstat(f.fileno()).st_size
                    f.seek(max(0, length - size))
                    got = f.read().splitlines()
            except FileNotFoundError:
                continue
            if length > size:
                got = got[1:]  # read from the middle of a line
            lines = got + lines
            size -= length
            if size <= 0:
                break
        return lines
