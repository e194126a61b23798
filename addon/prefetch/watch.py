"""Keep fresh: every `watch_interval` each watched tag is asked upstream with one manifest `HEAD`,
and a tag that moved is fetched through the running proxy (the prefetch client) before anyone asks,
politely (one at a time per registry, `watch_rate`, not while its circuit is open or pulls run
short). `watch.json` in the cache folder holds what it knows."""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.net.http import url

from .. import units
from ..mitm import internals
from ..mitm.flows import Mark
from ..proxy.routes import route_of
from ..registry import protocol
from ..registry.protocol import ImageReference, Kind, Route
from ..storage.store import PRIVATE_FILE
from ..upstream import client as upstream
from . import client as prefetch

if TYPE_CHECKING:
    from ..fleet.node import Fleet
    from ..observe.metrics import Metrics
    from ..proxy.interception import Interception
    from ..storage.eviction import Upkeep
    from ..storage.folder import CacheFolder
    from ..upstream.circuits import Circuits

logger = logging.getLogger(__name__)

STATE_FILE = "watch.json"
HEADER = "hubcache-watch"  # marks the watch's own pulls through the proxy (with a secret of this process)
JITTER = 0.1  # an interval lasts its length, give or take this share of it
STORE_RESERVE = 0.1  # the share of cache_size_limit the watch leaves to clients
RATE_RESERVE = 0.1  # below this share of its pull limit left, a registry gets no watch fetches
TIMEOUT = 30.0  # seconds a HEAD, a tags list or a token may take
_PATTERN = re.compile(r"[*?\[\]]")
_TAG_PATTERN = re.compile(r"[\w*?\[\]][\w.*?\[\]-]{0,127}")
_PLATFORM = re.compile(r"[a-z0-9]+/[a-z0-9_]+(?:/[a-z0-9]+)?")


class WatchError(Exception):
    """A watched tag could not be checked or fetched; the message is for an operator."""


@dataclass(frozen=True)
class Watched:
    """One `watch` entry: a repository, a tag or a tag pattern, and the platforms to fetch (none:
    every platform of the index)."""

    registry: str
    repository: str
    tag: str
    platforms: tuple[str, ...] = ()

    @property
    def pattern(self) -> bool:
        return _PATTERN.search(self.tag) is not None

    def image(self, tag: str) -> ImageReference:
        return ImageReference(self.registry, self.repository, tag)

    def __str__(self) -> str:
        platforms = f"@{','.join(self.platforms)}" if self.platforms else ""
        return f"{self.registry}/{self.repository}:{self.tag}{platforms}"

    @classmethod
    def parse(cls, text: str) -> Watched:
        """`[REGISTRY/]REPOSITORY[:TAG or PATTERN][@PLATFORM,PLATFORM]`; ValueError says what is wrong."""
        name, at, platforms = text.strip().partition("@")
        if at and ":" in platforms:
            raise ValueError(f"{text!r}: a digest never changes; watch a tag")
        chosen = tuple(p.strip() for p in platforms.split(",")) if at else ()
        for platform in chosen:
            if not _PLATFORM.fullmatch(platform):
                raise ValueError(f"{text!r}: {platform!r} is not a platform (write e.g. linux/amd64 or linux/arm64/v8)")
        path, colon, tag = name.rpartition(":")
        if not colon or "/" in tag:
            path, tag = name, "latest"
        if not _TAG_PATTERN.fullmatch(tag):
            raise ValueError(f"{text!r}: {tag!r} is neither a tag nor a tag pattern (write e.g. 3.12 or 22-*)")
        try:
            image = ImageReference.parse(f"{path}:latest")  # the name checked and normalised as Docker does
        except ValueError as e:
            raise ValueError(f"{text!r}: {str(e).partition(': ')[2]}") from None
        return cls(image.registry, image.repository, tag, chosen)


def parse_entries(texts: Sequence[str]) -> list[Watched]:
    """The `watch` option, parsed; OptionsError names the first bad entry."""
    entries = []
    for text in texts:
        try:
            entries.append(Watched.parse(text))
        except ValueError as e:
            raise exceptions.OptionsError(f"watch: {e}") from e
    return entries


def next_round(interval: float, chance: random.Random | None = None) -> float:
    """Seconds until the next round: the interval, jittered by up to JITTER of it either way."""
    return interval * (chance or random).uniform(1 - JITTER, 1 + JITTER)


def needs_fetch(cached: str | None, upstream_digest: str) -> bool:
    """Whether a tag upstream names `upstream_digest` needs fetching: only when the cache's copy
    of the tag names another (or none)."""
    return cached != upstream_digest


def expand(pattern: str, tags: Sequence[str], limit: int) -> list[str]:
    """The tags of a repository that `pattern` matches, the registry's last `limit` (registries
    list tags in lexical order, so the last are usually the newest versions), newest first. Only
    valid tags: each becomes the path of a request upstream."""
    matching = [t for t in tags if isinstance(t, str) and protocol.TAG_RE.fullmatch(t) and fnmatch.fnmatchcase(t, pattern)]
    return list(reversed(matching[-limit:])) if limit else []


def pulls_left(response: http.Response) -> tuple[int, int] | None:
    """(remaining, limit) from a registry's `ratelimit-remaining` and `ratelimit-limit` headers
    (`100;w=21600`), if it sends them."""
    try:
        remaining = int(response.headers["ratelimit-remaining"].partition(";")[0])
    except (KeyError, ValueError):
        return None
    try:
        limit = int(response.headers.get("ratelimit-limit", "").partition(";")[0])
    except ValueError:
        limit = 0
    return remaining, limit


def low(left: tuple[int, int]) -> bool:
    """Whether too few pulls are left for the watch to spend one: below RATE_RESERVE of the limit
    (none left when the registry sends no limit)."""
    remaining, limit = left
    return remaining <= max(0, int(limit * RATE_RESERVE))


def pause_reason(offline: bool, circuit_open: bool, stored: int | None, limit: int | None) -> str | None:
    """Why the watch asks nothing of a registry now, or None."""
    if offline:
        return "offline"
    if circuit_open:
        return "upstream down"
    if limit and stored is not None and stored >= limit * (1 - STORE_RESERVE):
        return "store nearly full"
    return None


@dataclass
class TagState:
    """What the watch knows of one watched tag (what `hubcache watch` shows)."""

    image: str
    digest: str = ""
    checked: float = 0.0  # time.time() of the last answer from upstream
    changed: float = 0.0  # time.time() the watch last fetched a new digest
    state: str = "waiting"


class Throttle:
    """The byte-rate cap of a watch fetch (`watch_rate`, shared by its blob threads), and its
    count of bytes. Also the progress the prefetch client reports to."""

    def __init__(self, rate: int, counted: list) -> None:
        self.rate = rate
        self.counted = counted  # metrics to increment by the bytes fetched
        self.bytes = 0
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def start(self, key: str, label: str, total: int) -> None:
        pass  # nobody watches these bars

    def advance(self, key: str, n: int) -> None:
        for counter in self.counted:
            counter.inc(n)
        with self._lock:
            self.bytes += n
            if not self.rate:
                return
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + n / self.rate
            wait = self._free_at - now - 1.0  # a second's worth of bytes may go at once
        if wait > 0:
            time.sleep(wait)  # in a blob thread of the fetch: it slows that fetch only


class Watch:
    def __init__(
        self,
        hosts: Interception,
        folder: CacheFolder,
        circuits: Circuits,
        fleet: Fleet,
        upkeep: Upkeep,
        metrics: Metrics,
        out: upstream.Upstream,
    ):
        self.hosts = hosts
        self.folder = folder
        self.circuits = circuits
        self.fleet = fleet
        self.upkeep = upkeep
        self.metrics = metrics
        self.upstream = out
        self.entries: list[Watched] = []
        self.states: dict[str, TagState] = {}  # by image (registry/repository:tag)
        self.rate = 0
        self.secret = secrets.token_hex(16)
        self._task: asyncio.Task | None = None
        self._tokens: dict[tuple[str, str], str] = {}  # (host, repository) -> Authorization, for one round
        self._limited: set[str] = set()  # registries that said few pulls are left, this round
        self._said_limited: set[str] = set()  # ... and said so in the log, until they have pulls again
        self._paused: dict[str, str] = {}  # by registry: why it is paused (said once)
        self._stored: int | None = None  # bytes of blobs in the store, when cache_size_limit is set
        self._first: set[str] = set()  # the digests the watch fetched that watched tags name now

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "watch",
            Sequence[str],
            [],
            "Images to keep fresh: REPOSITORY[:TAG or PATTERN][@PLATFORM,PLATFORM], e.g. python:3.12, "
            "docker.io/library/node:22-*, ghcr.io/org/base:latest@linux/amd64,linux/arm64. Each tag "
            "is checked upstream with a HEAD every watch_interval, and fetched when it changed.",
        )
        loader.add_option("watch_interval", int, 900, "Seconds between two checks of the watched tags (jittered by a tenth).")
        loader.add_option("watch_tag_limit", int, 10, "Tags a watched pattern expands to at most (the newest the registry lists).")
        loader.add_option(
            "watch_rate",
            str,
            "",
            "Bytes per second a watch fetch may take from upstream, e.g. 10MB; empty: no cap.",
        )

    def configure(self, updated: set[str]) -> None:
        if updated & {"watch", "registries", "registry_settings"}:
            self.entries = parse_entries(ctx.options.watch)
            for entry in self.entries:
                if not self.hosts.is_registry(ImageReference(entry.registry, entry.repository, "x").host):
                    raise exceptions.OptionsError(f"watch: {entry.registry} is not one of the registries hubcache caches (option `registries`)")
        if "watch_interval" in updated and ctx.options.watch_interval < 1:
            raise exceptions.OptionsError("watch_interval must be 1 or more seconds")
        if "watch_tag_limit" in updated and ctx.options.watch_tag_limit < 1:
            raise exceptions.OptionsError("watch_tag_limit must be 1 or more")
        if "watch_rate" in updated:
            try:
                self.rate = units.parse_size(ctx.options.watch_rate) if ctx.options.watch_rate else 0
            except ValueError as e:
                raise exceptions.OptionsError(f"watch_rate: {e} per second") from e
        if self._task and updated & {"watch", "watch_interval"}:
            self._restart()

    def running(self) -> None:
        self._restart()

    def done(self) -> None:
        if self._task:
            self._task.cancel()

    def _restart(self) -> None:
        if self._task:
            self._task.cancel()
        self._task = asyncio.create_task(self._loop())

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # The watch's own pulls through the proxy say so with this process's secret; the header
        # never travels further, and a client that guesses no secret only loses the header.
        claimed = flow.request.headers.pop(HEADER, None)
        if claimed is not None and secrets.compare_digest(claimed.encode("utf-8", "surrogateescape"), self.secret.encode()):
            flow.metadata[Mark.WATCH] = True

    def response(self, flow: http.HTTPFlow) -> None:
        """Count a client's tag request answered from the cache with a digest the watch fetched."""
        if not flow.metadata.get(Mark.ANSWERED) or flow.metadata.get(Mark.WATCH) or not flow.response or flow.response.status_code != 200:
            return
        route = route_of(flow)
        if route and route.kind is Kind.MANIFEST and not route.by_digest and flow.response.headers.get("docker-content-digest") in self._first:
            self.metrics.watch_served_first.labels(route.registry).inc()

    # the rounds

    async def _loop(self) -> None:
        while True:
            if self.entries:
                try:
                    await self.round()
                except Exception as e:  # a store that failed mid-round: the next round tries again
                    logger.error(f"hubcache: watch: round abandoned: {e}")
            await asyncio.sleep(next_round(ctx.options.watch_interval))

    async def round(self) -> None:
        """Check every watched entry once: registries side by side, one registry's entries one at
        a time."""
        self._tokens.clear()
        self._limited.clear()
        self._stored = None
        if self.upkeep.limit and (store := self.folder.store):
            self._stored = (await asyncio.to_thread(store.summary)).blob_bytes
        by_registry: dict[str, list[Watched]] = {}
        for entry in self.entries:
            by_registry.setdefault(entry.registry, []).append(entry)
        await asyncio.gather(*(self._registry_round(registry, entries) for registry, entries in by_registry.items()))
        await self._save()

    async def _registry_round(self, registry: str, entries: list[Watched]) -> None:
        for entry in entries:
            if not self._may_ask(entry):
                continue
            if not await self.fleet.claim_watch(str(entry), ctx.options.watch_interval * (1 - JITTER)):
                self._set_all(entry, "checked by another node")
                continue
            try:
                tags = await self._tags(entry) if entry.pattern else [entry.tag]
            except WatchError as e:
                self._set_all(entry, f"failed: {e}")
                logger.warning(f"hubcache: watch: {e}")
                continue
            for tag in tags:
                if not self._may_ask(entry):
                    break
                try:
                    await self._check(entry, tag)
                except WatchError as e:
                    self.states[str(entry.image(tag))].state = f"failed: {e}"
                    logger.warning(f"hubcache: watch: {e}")

    def _may_ask(self, entry: Watched) -> bool:
        """Whether the entry's registry may be asked now; if not, the entry says why (and the log
        once)."""
        host = entry.image("latest").host
        reason = pause_reason(ctx.options.offline, self.circuits.down(host) is not None, self._stored, self.upkeep.limit)
        if reason:
            self._pause(entry.registry, entry, reason)
            return False
        if self._paused.pop(entry.registry, None):
            logger.info(f"hubcache: watch: {entry.registry} is checked again")
        return True

    def _pause(self, registry: str, entry: Watched, reason: str) -> None:
        if self._paused.get(registry) != reason:
            self._paused[registry] = reason
            logger.info(f"hubcache: watch: {registry} paused ({reason})")
        self._set_all(entry, f"paused: {reason}")

    def _set_all(self, entry: Watched, state: str) -> None:
        prefix = f"{entry.registry}/{entry.repository}:"
        for image, known in self.states.items():
            if image.startswith(prefix) and (image[len(prefix) :] == entry.tag or entry.pattern):
                known.state = state
        if not entry.pattern:
            self.states.setdefault(str(entry.image(entry.tag)), TagState(str(entry.image(entry.tag)))).state = state

    async def _check(self, entry: Watched, tag: str) -> None:
        """One HEAD; a fetch only when the digest moved."""
        image = entry.image(tag)
        known = self.states.setdefault(str(image), TagState(str(image)))
        route = Route(Kind.MANIFEST, image.registry, image.repository, tag)
        answer = await self._ask(image, lambda like: upstream.request_for(like, route, "HEAD"))
        self.metrics.watch_checks.labels(image.registry).inc()
        if answer.status_code == 404:
            known.state = "not found upstream"
            return
        digest = answer.headers.get("docker-content-digest", "")
        if answer.status_code != 200 or not protocol.DIGEST_RE.fullmatch(digest):
            raise WatchError(f"{image}: upstream answered {answer.status_code} to a HEAD, with no digest")
        known.checked = time.time()
        store = self.folder.open_store()
        cached = await asyncio.to_thread(store.get_tag, image.registry, image.repository, tag)
        if not needs_fetch(cached.digest if cached else None, digest):
            known.digest, known.state = digest, "current"
            self.metrics.watch_success.labels(image.registry).set(time.time())
            return
        left = pulls_left(answer)
        if left and low(left):
            known.state = "waiting: rate limit"
            self._limited.add(image.registry)
            if image.registry not in self._said_limited:
                self._said_limited.add(image.registry)
                logger.warning(f"hubcache: watch: {image.registry} has {left[0]} pulls left; watch fetches wait until it has more")
            return
        if left and image.registry in self._said_limited:
            self._said_limited.discard(image.registry)
            logger.info(f"hubcache: watch: {image.registry} has {left[0]} pulls left; watch fetches resume")
        if image.registry in self._limited:
            known.state = "waiting: rate limit"
            return
        known.state = "fetching"
        fetched = await self._fetch(entry, image, digest)
        self._first.discard(known.digest)
        self._first.add(digest)
        known.digest, known.changed, known.state = digest, time.time(), "fetched"
        if self._stored is not None:
            self._stored += fetched
        self.metrics.watch_success.labels(image.registry).set(time.time())
        logger.info(f"hubcache: watch: {image} is now {digest}; fetched {units.size(fetched)}")

    async def _fetch(self, entry: Watched, image: ImageReference, digest: str) -> int:
        """Pull `image` at `digest` through this proxy, then point the tag at it."""
        proxy, confdir = self._proxy_url(), ctx.options.confdir
        throttle = Throttle(self.rate, [self.metrics.watch_fetched.labels(image.registry)])
        pinned = f"{image.registry}/{image.repository}@{digest}"

        def pull() -> prefetch.Result:
            ca = Path(confdir).expanduser() / "mitmproxy-ca-cert.pem"
            client = prefetch.RegistryClient(proxy, ca, timeout=TIMEOUT, headers={HEADER: self.secret})
            return prefetch.prefetch(self, client, pinned, list(entry.platforms), throttle, referrers=False)

        result = await asyncio.to_thread(pull)
        if result.error:
            raise WatchError(result.error)
        store = self.folder.open_store()
        await self.folder.note(store.set_tag, image.registry, image.repository, image.reference, digest)
        if manifest := await asyncio.to_thread(store.get_manifest, digest):
            self.fleet.publish_manifest(digest, manifest.media_type, manifest.body, (image.registry, image.repository, image.reference))
        return throttle.bytes

    def _proxy_url(self) -> str:
        """The address of this proxy's regular listener, as a client on this machine dials it."""
        if addresses := internals.regular_listen_addrs():
            host, port = addresses[0][:2]
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
            return f"http://{f'[{host}]' if ':' in host else host}:{port}"
        raise WatchError("hubcache has no regular proxy listener to fetch through")

    async def _tags(self, entry: Watched) -> list[str]:
        """The tags a pattern names now, through `tags/list` (capped by watch_tag_limit)."""
        image = entry.image("latest")
        answer = await self._ask(image, lambda like: _plain(like, f"/v2/{image.repository}/tags/list"))
        try:
            listed = protocol.parse_json(answer.content or b"").get("tags") or [] if answer.status_code == 200 else None
        except (ValueError, AttributeError):
            listed = None
        if not isinstance(listed, list):
            raise WatchError(f"{entry}: upstream answered {answer.status_code} to tags/list, with no list of tags")
        tags = expand(entry.tag, listed, ctx.options.watch_tag_limit)
        for tag in tags:
            self.states.setdefault(str(entry.image(tag)), TagState(str(entry.image(tag))))
        return tags

    # hubcache's own requests upstream

    async def _ask(self, image: ImageReference, make: Callable[[http.HTTPFlow], http.Request]) -> http.Response:
        """The answer of the registry of `image` to the request `make` builds, with a token (or
        the configured login) when the registry asks for one; WatchError when there is none."""
        key = (image.host, image.repository)
        try:
            for _ in range(2):
                like = _like(image.host)  # each request its own connection: one is never reused for another host
                request = make(like)
                request.headers["accept"] = prefetch.RegistryClient.ACCEPT
                if authorization := self._tokens.get(key):
                    request.headers["authorization"] = authorization
                answer = upstream.available(await self.upstream.send(like, request, TIMEOUT))
                if answer.status_code != 401 or authorization:
                    return answer
                self._tokens[key] = await self._authorization(image, answer.headers.get("www-authenticate", ""))
        except upstream.UpstreamError as e:
            raise WatchError(f"{image}: {e}") from None
        return answer

    async def _authorization(self, image: ImageReference, challenge: str) -> str:
        """What the registry's challenge asks for: a pull token from its realm (asked with the
        registry's configured login, if any), or the login itself for Basic."""
        own = self.hosts.settings.get(image.host)
        login = own.basic if own and own.credentials else None
        realm = protocol.token_request(challenge, image.repository)
        if realm is None:
            if protocol.challenge(challenge)[0] == "basic" and login:
                return login
            raise WatchError(f"{image}: the registry wants credentials and registry_settings has none for {image.host}")
        request = http.Request.make("GET", realm)
        if not request.scheme == "https":
            raise WatchError(f"{image}: the registry's token realm is not https")
        request.host_header = url.hostport(request.scheme, request.host, request.port)
        if login:
            request.headers["authorization"] = login
        answer = upstream.available(await self.upstream.send(_like(request.host), request, TIMEOUT, follow=True))
        token = protocol.token_of(answer.content or b"") if answer.status_code == 200 else None
        if not token:
            raise WatchError(f"{image}: the token service answered {answer.status_code}, with no token")
        return f"Bearer {token}"

    # what operators see

    def snapshot(self) -> list[dict]:
        """The watched tags (read by the status page's threads too)."""
        return [asdict(state) for state in sorted(list(self.states.values()), key=lambda s: s.image)]

    async def _save(self) -> None:
        if store := self.folder.store:
            path = store.directory / STATE_FILE
            text = json.dumps({"entries": [str(e) for e in self.entries], "tags": self.snapshot()}, indent=1)
            try:
                await asyncio.to_thread(_write, path, text)
            except OSError as e:
                logger.warning(f"hubcache: watch: cannot write {path}: {e.strerror or e}")


def read_state(folder: Path) -> dict | None:
    """What the last round wrote (for `hubcache watch`), or None before any round."""
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def _write(path: Path, text: str) -> None:
    """Whole or not at all, and private like everything in the cache folder (it names images)."""
    temporary = path.with_suffix(".tmp")
    with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "w") as f:
        f.write(text)
    temporary.replace(path)


def _plain(like: http.HTTPFlow, target: str) -> http.Request:
    """A GET of `target` (built by the watch from a checked name) on the host `like` stands for."""
    authority = url.hostport("https", like.request.host, like.request.port)
    request = http.Request.make("GET", f"https://{authority}{target}")
    request.host_header = authority
    return request


def _like(host: str) -> http.HTTPFlow:
    """A flow that stands for the watch as the client of its own requests to `host`."""
    client = connection.Client(peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=time.time())
    flow = http.HTTPFlow(client, connection.Server(address=None))
    flow.request = http.Request.make("GET", f"https://{host}/v2/")
    flow.request.headers["user-agent"] = "hubcache-watch"
    return flow
