"""The miss journal: one JSON object per line, appended for every request the store could not answer.

Each line holds: time (UTC, ISO 8601), registry, repository, reference, digest, bytes, and what
happened (`outcome`), e.g. "filled", "passed", "stale", "failed: <reason>". Credentials are never
written; the file is readable by its owner only (it names private repositories). A line is written
with a single `write` on a file opened for appending, so concurrent writers (threads or processes)
never interleave within a line.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger(__name__)


class MissJournal:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    def record(
        self,
        *,
        registry: str,
        repository: str,
        reference: str,
        outcome: str,
        digest: str | None = None,
        size: int | None = None,
        kind: str = "",
    ) -> None:
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "kind": kind,
            "registry": registry,
            "repository": repository,
            "reference": reference,
            "digest": digest,
            "bytes": size,
            "outcome": outcome,
        }
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
        except OSError as e:
            logger.warning(f"miss journal {self.path} not written: {e.strerror}")

    def entries(self) -> list[dict]:
        """Every readable line; a torn last line (a crash mid-write) is skipped."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        result = []
        for line in text.splitlines():
            try:
                result.append(json.loads(line))
            except ValueError:
                continue
        return result
