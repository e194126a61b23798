"""A circuit breaker per upstream host and port: an outage costs one wait, not one per request, and
a miss is worth one try. Only hubcache's own requests for a canonical route open one; probes run in
the background with backoff, and a request only upstream can answer probes at once."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks

from ..mitm.flows import Mark
from ..observe.metrics import Metrics
from ..proxy.interception import OWN_PORT, Interception
from ..registry import protocol
from ..registry.settings import AUTH_HOSTS
from . import client as upstream

logger = logging.getLogger(__name__)

FIRST_RETRY = 2.0  # seconds before a host that failed is probed again
TRIAL_INTERVAL = 1.0  # the least time between two probes a request started
DOWN = "hubcache: {host} is down"  # the start of the error of a connection not attempted
NOT_WAITED = "; not waited for"  # its end
PROBE_AGENT = "hubcache-probe"  # says what a probe is, in upstream's logs
DOCKER_HUB_REALM = "/token"  # auth.docker.io's realm, known before a challenge names it

Key = tuple[str, int]  # a canonical host and port


def level(reason: str, otherwise: int = logging.WARNING) -> int:
    """The log level of a line about an upstream failure: a host already reported down (one line
    when it went down) is not reported again for every request it is not asked."""
    return logging.DEBUG if reason.endswith(NOT_WAITED) else otherwise


@dataclass
class Circuit:
    reason: str
    since: float  # time.time() it went down
    retry_at: float  # time.monotonic() of the next background probe
    backoff: float
    probe: str  # the URL probed with a GET
    probed_at: float = float("-inf")  # time.monotonic() the last probe started
    trial: asyncio.Task | None = field(default=None, repr=False)  # the probe in flight


class Circuits:
    def __init__(self, hosts: Interception, metrics: Metrics, out: upstream.Upstream | None = None) -> None:
        self.hosts = hosts
        self.metrics = metrics
        self.upstream = out or upstream.Upstream()
        self.open: dict[Key, Circuit] = {}  # the hosts down now
        self._probing: dict[Key, str] = {}  # the mark (an SNI) of each probe's connection
        # token hosts -> the realm path a registry's challenge named
        self.realms: dict[Key, str] = {(h, OWN_PORT): DOCKER_HUB_REALM for h in AUTH_HOSTS.values()}
        self.challenges: dict[str, str] = {}  # by registry (as routes name it): what its /v2/ answered last
        self._task: asyncio.Task | None = None

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "upstream_retry_max",
            int,
            60,
            "The longest wait, in seconds, between two background probes of a registry or token "
            "host that is down (the wait doubles from 2 s up to this). A pull that needs upstream "
            "probes it at once anyway.",
        )

    def configure(self, updated: set[str]) -> None:
        if "upstream_retry_max" in updated and ctx.options.upstream_retry_max < FIRST_RETRY:
            raise exceptions.OptionsError(f"upstream_retry_max must be at least {FIRST_RETRY:g} seconds")

    def running(self) -> None:
        self._task = asyncio.create_task(self._probe_periodically())

    def done(self) -> None:
        for task in [self._task, *(c.trial for c in self.open.values())]:
            if task:
                task.cancel()

    # what hubcache reports

    def down(self, host: str, port: int = OWN_PORT) -> Circuit | None:
        """The open circuit of `host`:`port`, if it is down."""
        return self.open.get((host.lower(), port))

    def key(self, request: http.Request) -> Key | None:
        """The circuit a request of hubcache's own may open: a registry's API or a token realm a
        registry named, on the host's own port; None for anything else."""
        host, path = request.host.lower(), request.path.partition("?")[0]
        if request.scheme != "https" or request.port != OWN_PORT or not self.hosts.intercepts(host):
            return None
        if self.hosts.is_registry(host):
            return (host, OWN_PORT) if path.startswith("/v2/") else None
        return (host, OWN_PORT) if self.realms.get((host, OWN_PORT)) == path else None

    def failed(self, request: http.Request, reason: str) -> None:
        """hubcache's own `request` got no answer."""
        key = self.key(request)
        if key is None or key in self.open or reason.startswith(DOWN.format(host=key[0])):
            return
        path = "/v2/" if self.hosts.is_registry(key[0]) else self.realms[key]
        self.open[key] = Circuit(reason, time.time(), time.monotonic() + FIRST_RETRY, FIRST_RETRY, f"https://{key[0]}{path}")
        self.metrics.upstream_up.labels(key[0]).set(0)
        logger.warning(f"hubcache: {key[0]} is down ({reason}); answering from the cache without waiting for it")

    def answered(self, key: Key) -> None:
        if not self.hosts.intercepts(key[0]) or key[1] != OWN_PORT:
            return
        self.metrics.upstream_up.labels(key[0]).set(1)
        if circuit := self.open.pop(key, None):
            logger.warning(f"hubcache: {key[0]} is back after {time.time() - circuit.since:.0f}s")

    def refusal(self, host: str, port: int, client: connection.Client) -> str | None:
        """Why a connection to `host`:`port` is not attempted now (None: it is): the host is down
        and this is not its probe."""
        key = (host.lower(), port)
        circuit = self.open.get(key)
        if circuit is None or (self._probing.get(key) and client.sni == self._probing[key]):
            return None
        return f"{DOWN.format(host=key[0])} ({circuit.reason}){NOT_WAITED}"

    async def attempt(self, host: str, port: int) -> bool:
        """For a request only upstream can answer, to a host that is down: whether the host is
        back, by the outcome of a probe started now (or of the one in flight), waited for up to
        `revalidate_timeout`. A probe that failed less than TRIAL_INTERVAL ago is the outcome."""
        key = (host.lower(), port)
        circuit = self.open.get(key)
        if circuit is None:
            return True
        trial = circuit.trial
        if trial is None or trial.done():
            if time.monotonic() - circuit.probed_at < TRIAL_INTERVAL:
                return False
            trial = self._start(key, circuit)
        try:
            await asyncio.wait_for(asyncio.shield(trial), ctx.options.revalidate_timeout)
        except TimeoutError:
            return False
        return key not in self.open

    # hooks

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        # hubcache's own requests are refused before they start (upstream.run); this catches the
        # clients' requests that pass through to a host that is down.
        if not data.server.error and data.server.address:
            if reason := self.refusal(_name(data.server), data.server.address[1], data.client):
                data.server.error = reason

    def response(self, flow: http.HTTPFlow) -> None:
        # Only what came from upstream: not hubcache's own answers, nor a relayed copy of one.
        if flow.metadata.get(Mark.ANSWERED) or flow.metadata.get(Mark.RELAYED) or not flow.response:
            return
        if flow.response.status_code < 500:
            self.answered((flow.request.host.lower(), flow.request.port))
        if flow.response.status_code == 401 and (registry := self.hosts.registry(flow)):
            self._learn(registry, flow.request.path, flow.response.headers.get("www-authenticate", ""))

    def _learn(self, registry: str, path: str, challenge: str) -> None:
        """A registry's own challenge: its token realm, and what `/v2/` answers while it is down."""
        scheme, fields = protocol.challenge(challenge)
        realm = urlsplit(fields.get("realm", ""))
        if scheme != "bearer" or realm.scheme != "https" or not realm.hostname:
            return
        host = realm.hostname.lower()
        try:
            relayed = (realm.port or OWN_PORT) == OWN_PORT and self.hosts.intercepts(host) and not self.hosts.is_registry(host)
        except ValueError:
            return  # not a URL anyone could be sent to
        if relayed:  # a token host hubcache relays (cache/hooks.py), and answers for while it is down
            self.realms[(host, OWN_PORT)] = realm.path or "/"
            if path in ("/v2", "/v2/"):
                self.challenges[protocol.canonical_registry(registry)] = challenge

    # the probes

    async def _probe_periodically(self) -> None:
        while True:
            await asyncio.sleep(FIRST_RETRY / 4)
            now = time.monotonic()
            for key, circuit in list(self.open.items()):
                if circuit.retry_at <= now and (circuit.trial is None or circuit.trial.done()):
                    self._start(key, circuit)

    def _start(self, key: Key, circuit: Circuit) -> asyncio.Task:
        circuit.probed_at = time.monotonic()
        circuit.trial = asyncio.create_task(self._probe(key, circuit))
        return circuit.trial

    async def _probe(self, key: Key, circuit: Circuit) -> None:
        mark = self._probing[key] = f"probe-{secrets.token_hex(8)}.hubcache.invalid"
        try:
            request = http.Request.make("GET", circuit.probe)
            request.headers["user-agent"] = PROBE_AGENT
            request.host_header = key[0]
            client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=time.time())
            client.sni = mark
            flow = upstream.subrequest(http.HTTPFlow(client, connection.Server(address=None)), request)
            answer: http.Response | None = await self.upstream.run(flow, ctx.options.revalidate_timeout)
        except upstream.UpstreamError:
            answer = None
        finally:
            self._probing.pop(key, None)
        if answer is not None and answer.status_code < 500:  # a 429 is an answer: the host is up
            self.answered(key)
        elif key in self.open:
            circuit.backoff = min(circuit.backoff * 2, ctx.options.upstream_retry_max)
            circuit.retry_at = time.monotonic() + circuit.backoff


def _name(server: connection.Server) -> str:
    """The name the connection is for (its SNI over TLS, as other hooks may have re-addressed it)."""
    return (server.sni or (server.address[0] if server.address else "")).lower()
