"""The cache folder (option `cache_dir`): the content store (`storage/store.py`) and the miss journal
(`storage/journal.py`). `CacheFolder` is their one owner; the cache, upkeep, the recorder and the status
page take them from it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions
from mitmproxy.addonmanager import Loader

from ..registry.protocol import Route
from ..units import DAY, parse_size
from .journal import MissJournal, Outcome
from .store import Store

logger = logging.getLogger(__name__)


class FolderClosed(RuntimeError):
    """The cache folder is not open: hubcache is not yet configured, or shutting down."""


class CacheFolder:
    def __init__(self) -> None:
        self.store: Store | None = None  # None until `cache_dir` is configured, and after done
        self.journal: MissJournal | None = None

    def open_store(self) -> Store:
        """The content store, for code that only runs while hubcache serves (a method: mitmproxy
        reads every attribute of an addon when it is added, before the folder is open)."""
        if self.store is None:
            raise FolderClosed("the cache folder is not open")
        return self.store

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "cache_dir",
            str,
            "cache",
            "Folder of the content store (diskcache) and the miss journal (misses.jsonl).",
        )
        loader.add_option(
            "journal_size",
            str,
            "8MiB",
            "Size at which the miss journal is rotated (to misses.<time>.<pid>.jsonl), e.g. 8MiB.",
        )
        loader.add_option(
            "journal_rotate_days",
            int,
            1,
            "Days after its first line the miss journal is rotated; 0: by size only.",
        )
        loader.add_option(
            "journal_keep",
            int,
            7,
            "Rotated miss journals kept (the oldest beyond are deleted), so the journal takes at "
            "most journal_size times journal_keep + 1 on disk.",
        )
        loader.add_option(
            "journal_repeat_seconds",
            int,
            60,
            "Seconds within which a miss identical to one journalled (same request, same outcome: a "
            "client repeating a refused or negatively cached request) is not journalled again; 0 "
            "journals every one.",
        )

    def configure(self, updated: set[str]) -> None:
        if "journal_size" in updated:
            try:
                size = parse_size(ctx.options.journal_size)
            except ValueError as e:
                raise exceptions.OptionsError(f"journal_size: {e}") from e
            if size < 1:
                raise exceptions.OptionsError("journal_size must be at least 1 byte")
        for name in ("journal_rotate_days", "journal_keep", "journal_repeat_seconds"):
            if name in updated and getattr(ctx.options, name) < 0:
                raise exceptions.OptionsError(f"{name} must be 0 or more")
        if "cache_dir" in updated:
            directory = Path(ctx.options.cache_dir).expanduser()
            if not self.store or self.store.directory != directory:
                self._open(directory)
        if self.journal:
            self.journal.max_bytes = parse_size(ctx.options.journal_size)
            self.journal.max_age = ctx.options.journal_rotate_days * DAY
            self.journal.keep = ctx.options.journal_keep
            self.journal.repeat_seconds = ctx.options.journal_repeat_seconds

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

    async def journal_miss(self, route: Route, outcome: Outcome, reason: str | None, digest: str | None = None, size: int | None = None) -> None:
        """One line in the miss journal for a request the store could not answer."""
        if self.journal is None:
            raise FolderClosed("the cache folder is not open")
        await asyncio.to_thread(
            self.journal.record,
            kind=route.kind.value,
            registry=route.registry,
            repository=route.name,
            reference=route.reference,
            digest=digest or (route.reference if route.by_digest else None),
            size=size,
            outcome=outcome,
            reason=reason,
        )
