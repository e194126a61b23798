"""A circuit breaker per upstream host: an outage costs one wait, not one per request.

The first time a registry or token host fails (refused, unresolvable, or silent past its limit),
its circuit opens: hubcache stops connecting to it, so every request that would have waited on it
is answered at once from what the cache holds (a tag from its last known digest, public content,
a local token, a registry error for what is missing). Meanwhile the host is probed in the
background (`HEAD /v2/`, through mitmproxy like every request of hubcache's own), first after
`FIRST_RETRY` seconds and then twice as long each time it is still down, up to `MAX_RETRY`. Any
answer from it, to a probe or to anything else, closes the circuit. One log line says when a host
goes down and one when it is back; `hubcache_upstream_up{host}` and the status page show the state.

The probe repeats, as a HEAD without credentials, the request that found the host down (a HEAD
is free under Docker Hub's rate limit), so a host that answers some paths while the one clients
need hangs (a token endpoint) stays down until that path answers. While a probe runs, only the
probe connects: clients keep getting answers at once.

Only the hosts hubcache intercepts (registries and their token hosts) have circuits: others are
the clients' business, and their names are the clients' to choose.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass

from mitmproxy import connection, http
from mitmproxy.proxy import server_hooks

from . import upstream
from .flowdata import Mark
from .hosts import Interception
from .metrics import Metrics

logger = logging.getLogger(__name__)

FIRST_RETRY = 2.0  # seconds before a host that failed is probed again
MAX_RETRY = 60.0
PROBE_TIMEOUT = 5.0
DOWN = "hubcache: {host} is down"  # the start of the error of a connection not attempted
NOT_WAITED = "; not waited for"  # its end


def level(reason: str, otherwise: int = logging.WARNING) -> int:
    """The log level of a line about an upstream failure: a host already reported down (one line
    when it went down) is not reported again for every request it is not asked."""
    return logging.DEBUG if reason.endswith(NOT_WAITED) else otherwise


@dataclass
class Circuit:
    reason: str
    since: float  # time.time() it went down
    retry_at: float  # time.monotonic() of the next probe
    backoff: float
    probe: str  # the URL probed with a HEAD


class Circuits:
    def __init__(self, hosts: Interception, metrics: Metrics, out: upstream.Upstream | None = None) -> None:
        self.hosts = hosts
        self.metrics = metrics
        self.upstream = out or upstream.Upstream()
        self.open: dict[str, Circuit] = {}  # by host: the hosts down now
        self._probing: dict[str, str] = {}  # by host: the mark (an SNI) of its probe's connection
        self._task: asyncio.Task | None = None
        self._probes: set[asyncio.Task] = set()  # kept, or the loop could drop a probe under way

    def running(self) -> None:
        self._task = asyncio.create_task(self._probe_periodically())

    def done(self) -> None:
        for task in [self._task, *self._probes]:
            if task:
                task.cancel()

    # what hubcache reports

    def down(self, host: str) -> Circuit | None:
        """The open circuit of `host`, if it is down."""
        return self.open.get(host.lower())

    def failed(self, host: str, reason: str, url: str = "") -> None:
        """`host` failed (`url`: what was asked of it, probed later)."""
        host = host.lower()
        if not self.hosts.intercepts(host) or host in self.open or reason.startswith(DOWN.format(host=host)):
            return
        probe = url or f"https://{host}/v2/"
        self.open[host] = Circuit(reason, time.time(), time.monotonic() + FIRST_RETRY, FIRST_RETRY, probe)
        self.metrics.upstream_up.labels(host).set(0)
        logger.warning(f"hubcache: {host} is down ({reason}); answering from the cache without waiting for it")

    def answered(self, host: str) -> None:
        host = host.lower()
        if not self.hosts.intercepts(host):
            return
        self.metrics.upstream_up.labels(host).set(1)
        if circuit := self.open.pop(host, None):
            logger.warning(f"hubcache: {host} is back after {time.time() - circuit.since:.0f}s")

    def refusal(self, host: str, client: connection.Client) -> str | None:
        """Why a connection to `host` is not attempted now (None: it is): the host is down and
        this is not its probe."""
        host = host.lower()
        circuit = self.open.get(host)
        if circuit is None or (self._probing.get(host) and client.sni == self._probing[host]):
            return None
        return f"{DOWN.format(host=host)} ({circuit.reason}){NOT_WAITED}"

    # hooks

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # hubcache's own requests are refused before they start (upstream.run); this catches the
        # clients' requests that pass through to a host that is down.
        if not data.server.error and (reason := self.refusal(_name(data.server), data.client)):
            data.server.error = reason

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.failed(_name(data.server), data.server.error or "cannot connect")

    def response(self, flow: http.HTTPFlow) -> None:
        # Only what came from upstream: not hubcache's own answers, nor a relayed copy of one.
        if flow.metadata.get(Mark.ANSWERED) or flow.metadata.get(Mark.RELAYED):
            return
        if flow.response and flow.response.status_code < 500:
            self.answered(flow.request.host)

    # the probe

    async def _probe_periodically(self) -> None:
        while True:
            await asyncio.sleep(FIRST_RETRY / 4)
            now = time.monotonic()
            for host, circuit in list(self.open.items()):
                if circuit.retry_at <= now and host not in self._probing:
                    probe = asyncio.create_task(self._probe(host, circuit))
                    self._probes.add(probe)
                    probe.add_done_callback(self._probes.discard)

    async def _probe(self, host: str, circuit: Circuit) -> None:
        mark = self._probing[host] = f"probe-{secrets.token_hex(8)}.hubcache.invalid"
        try:
            request = http.Request.make("HEAD", circuit.probe)
            request.host_header = host
            client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=time.time())
            client.sni = mark
            flow = upstream.subrequest(http.HTTPFlow(client, connection.Server(address=None)), request)
            answer: http.Response | None = await self.upstream.run(flow, PROBE_TIMEOUT)
        except upstream.UpstreamError:
            answer = None
        finally:
            self._probing.pop(host, None)
        if answer is not None and answer.status_code < 500:  # a 429 is an answer: the host is up
            self.answered(host)
        elif host in self.open:
            circuit.backoff = min(circuit.backoff * 2, MAX_RETRY)
            circuit.retry_at = time.monotonic() + circuit.backoff


def _name(server: connection.Server) -> str:
    """The name the connection is for (its SNI over TLS, as other hooks may have re-addressed it)."""
    return (server.sni or (server.address[0] if server.address else "")).lower()
