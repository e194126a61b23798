"""The cache folder (option `cache_dir`): the content store (store.py) and the miss journal
(journal.py). `CacheFolder` is their one owner; the cache, upkeep, the recorder and the status
page take them from it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from .journal import MissJournal
from .protocol import Route
from .store import Store

logger = logging.getLogger(__name__)


class CacheFolder:
    def __init__(self) -> None:
        self.store: Store | None = None
        self.journal: MissJournal | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "cache_dir",
            str,
            "cache",
            "Folder of the content store (diskcache) and the miss journal (misses.jsonl).",
        )

    def configure(self, updated: set[str]) -> None:
        if "cache_dir" in updated:
            directory = Path(ctx.options.cache_dir).expanduser()
            if not self.store or self.store.directory != directory:
                self._open(directory)

    def _open(self, directory: Path) -> None:
        try:
            store = Store(directory)  # makes the folder, private
        except OSError as e:
            raise exceptions.OptionsError(f"cache_dir: cannot use {directory}: {e.strerror or e}") from e
        self.done()
        self.store = store
        self.journal = MissJournal(directory / "misses.jsonl")
        logger.info(f"hubcache: content store in {directory.resolve()}")

    def done(self) -> None:
        if self.store:
            self.store.close()
        self.store = None

    @staticmethod
    async def note(write: Callable[..., Any], *args: Any) -> None:
        """Write to the index in a thread; if it cannot be written (full disk, read-only folder),
        only this note is lost, with a line saying why."""
        try:
            await asyncio.to_thread(write, *args)
        except OSError as e:
            logger.warning(f"hubcache: not noted in the cache: {e.strerror or e}")

    async def journal_miss(self, route: Route, outcome: str, digest: str | None = None, size: int | None = None) -> None:
        """One line in the miss journal for a request the store could not answer."""
        assert self.journal
        await asyncio.to_thread(
            self.journal.record,
            kind=route.kind.value,
            registry=route.registry,
            repository=route.name,
            reference=route.reference,
            digest=digest or (route.reference if route.by_digest else None),
            size=size,
            outcome=outcome,
        )
