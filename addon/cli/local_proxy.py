"""hubcache on an ephemeral loopback port in a thread of this process, for commands that pull
through it (`hubcache prefetch`)."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from ..prefetch.client import PrefetchError

if TYPE_CHECKING:
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

    from ..proxy.interception import Interception
    from ..storage.folder import CacheFolder


class LocalProxy:
    """hubcache on 127.0.0.1:<ephemeral>, in a thread of this process, for the duration of a `with`."""

    def __init__(self, settings: list[str]):
        self.settings = settings
        self.port = 0
        self.folder: CacheFolder | None = None
        self.hosts: Interception | None = None
        self._master: DumpMaster | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._thread_main, name="hubcache-proxy", daemon=True)

    def __enter__(self) -> LocalProxy:
        self._thread.start()
        self._ready.wait()
        if self._error:
            raise self._error
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None) -> None:
        if self._master:
            self._master.shutdown()
        self._thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def options(self) -> Options:
        assert self._master
        return self._master.options

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:  # handed to the caller by __enter__
            self._error = self._error or e
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        from mitmproxy import options
        from mitmproxy.tools.dump import DumpMaster

        from ..addons import Hubcache

        master = DumpMaster(options.Options(), with_termlog=False, with_dumper=False)
        started = _Started()
        master.addons.add(Hubcache(), started)
        # A proxy of its own for this command: no status listener (a running hubcache has it).
        master.options.set("listen_host=127.0.0.1", "listen_port=0", "status_listen=", *self.settings)
        self.hosts, self.folder = master.addons.get("interception"), master.addons.get("cachefolder")
        run = asyncio.create_task(master.run())
        proxyserver = master.addons.get("proxyserver")
        await asyncio.wait({run, asyncio.ensure_future(started.event.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if run.done():
            await run
            raise PrefetchError("the proxy stopped during start")
        self.port = proxyserver.listen_addrs()[0][1]
        self._master = master
        self._ready.set()
        await run


class _Started:
    """An addon whose `running` hook says the proxy is listening (mitmproxy calls it once the
    servers are up)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def running(self) -> None:
        self.event.set()
