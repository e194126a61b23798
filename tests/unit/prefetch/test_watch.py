"""Keep fresh (addon/watch.py): the `watch` options, and the decisions of a round, with a fake
upstream. The real registry, retagged under a running proxy, is in tests/integration/test_watch.py."""

from __future__ import annotations

import hashlib
import random

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons

from hubcache.fleet.node import Fleet
from hubcache.observe.metrics import Metrics
from hubcache.options import CommonOptions
from hubcache.prefetch.watch import (
    JITTER,
    Throttle,
    Watch,
    Watched,
    expand,
    low,
    needs_fetch,
    next_round,
    parse_entries,
    pause_reason,
    pulls_left,
    read_state,
)
from hubcache.proxy.interception import Interception
from hubcache.storage.eviction import Upkeep
from hubcache.storage.folder import CacheFolder
from hubcache.upstream import client as upstream
from hubcache.upstream.circuits import Circuits

OLD = "sha256:" + "1" * 64
NEW = "sha256:" + "2" * 64
REPO = "library/python"


class FakeUpstream(upstream.Upstream):
    """Answers hubcache's own requests from `answers` in order, and keeps what was sent."""

    def __init__(self) -> None:
        self.sent: list[http.Request] = []
        self.answers: list[http.Response] = []

    async def send(self, like: http.HTTPFlow, request: http.Request, timeout: float, follow: bool = False) -> http.Response:
        self.sent.append(request)
        assert self.answers, f"the watch asked upstream unexpectedly: {request.method} {request.url}"
        return self.answers.pop(0)


def answer(status: int = 200, digest: str = NEW, **headers: str) -> http.Response:
    return http.Response.make(status, b"", {"Docker-Content-Digest": digest, **headers})


@pytest.fixture
def env(tmp_path):
    hosts = Interception()
    metrics = Metrics(hosts)
    fake = FakeUpstream()
    folder = CacheFolder()
    circuits = Circuits(hosts, metrics, fake)
    watch = Watch(hosts, folder, circuits, Fleet(), Upkeep(folder), metrics, fake)
    fetched: list[tuple[str, str]] = []

    async def fetch(entry, image, digest):
        fetched.append((str(image), digest))
        return 0

    watch._fetch = fetch
    with taddons.context(CommonOptions(), hosts, folder, circuits, watch) as tctx:
        tctx.options.update(cache_dir=str(tmp_path), watch=["python:3.12"])
        yield watch, fake, fetched, tctx
        folder.done()


# the options


def test_entries_parse_with_tags_patterns_and_platforms():
    assert Watched.parse("python:3.12") == Watched("docker.io", "library/python", "3.12")
    assert Watched.parse("docker.io/library/node:22-*").pattern
    assert Watched.parse("ghcr.io/org/base:latest@linux/amd64,linux/arm64") == Watched(
        "ghcr.io", "org/base", "latest", ("linux/amd64", "linux/arm64")
    )
    assert Watched.parse("registry.example:5000/team/app") == Watched("registry.example:5000", "team/app", "latest")
    assert str(Watched.parse("ghcr.io/org/base@linux/arm64/v8")) == "ghcr.io/org/base:latest@linux/arm64/v8"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("python@sha256:" + "1" * 64, "a digest never changes"),
        ("python:3.12@linux", "'linux' is not a platform"),
        ("python:3 12", "is neither a tag nor a tag pattern"),
        ("Python:3.12", "invalid repository name"),
        ("-bad:1", "'-bad:1': invalid repository name"),
    ],
)
def test_bad_entries_are_refused_with_a_readable_message(text, says):
    with pytest.raises(exceptions.OptionsError, match=r"^watch: ") as refused:
        parse_entries([text])
    assert says in str(refused.value)


def test_the_options_are_checked_in_configure(env):
    _, _, _, tctx = env
    for setting, says in [
        ({"watch_interval": 0}, "watch_interval must be 1 or more seconds"),
        ({"watch_tag_limit": 0}, "watch_tag_limit must be 1 or more"),
        ({"watch_rate": "fast"}, "watch_rate: 'fast' is not a size"),
        ({"watch": ["registry.example/org/app:1"]}, "registry.example is not one of the registries"),
    ]:
        with pytest.raises(exceptions.OptionsError, match=says):
            tctx.options.update(**setting)
    tctx.options.update(watch_rate="10MB", watch=["python:3.12", "node:22-*"])
    assert env[0].rate == 10_000_000 and len(env[0].entries) == 2


# the decisions


def test_the_interval_is_jittered_within_a_tenth():
    chance = random.Random(1)
    waits = [next_round(900, chance) for _ in range(200)]
    assert all(900 * (1 - JITTER) <= w <= 900 * (1 + JITTER) for w in waits)
    assert len({round(w) for w in waits}) > 10


def test_only_a_moved_or_unknown_tag_is_fetched():
    assert not needs_fetch(NEW, NEW)
    assert needs_fetch(OLD, NEW)
    assert needs_fetch(None, NEW)


def test_a_pattern_expands_to_the_newest_tags_the_registry_lists_capped():
    listed = ["20-alpine", "21-alpine", "22-alpine", "22-slim", "latest", 7]
    assert expand("2?-alpine", listed, 2) == ["22-alpine", "21-alpine"]
    assert expand("*", ["a"], 10) == ["a"]


def test_a_listed_name_that_is_no_tag_never_becomes_a_request():
    hostile = ["1/../../../v2/other/manifests/x", "1?x=y", "1#", "1 2", "-1", "a" * 129, "1"]
    assert expand("1*", hostile, 10) == ["1"]


def test_pauses():
    assert pause_reason(True, False, None, None) == "offline"
    assert pause_reason(False, True, None, None) == "upstream down"
    assert pause_reason(False, False, 95, 100) == "store nearly full"
    assert pause_reason(False, False, 89, 100) is None
    assert pause_reason(False, False, 10**12, None) is None


def test_few_pulls_left_stops_fetches():
    assert pulls_left(answer(**{"ratelimit-remaining": "5;w=21600", "ratelimit-limit": "100;w=21600"})) == (5, 100)
    assert pulls_left(answer()) is None
    assert low((5, 100)) and low((0, 0))
    assert not low((50, 100)) and not low((1, 0))


# a round


async def test_an_unchanged_tag_costs_one_head_and_fetches_nothing(env):
    watch, fake, fetched, _ = env
    watch.folder.store.set_tag("docker.io", REPO, "3.12", NEW)
    fake.answers.append(answer(digest=NEW))
    await watch.round()
    assert [(r.method, r.path) for r in fake.sent] == [("HEAD", f"/v2/{REPO}/manifests/3.12")]
    assert fetched == []
    assert watch.states[f"docker.io/{REPO}:3.12"].state == "current"


async def test_a_moved_tag_is_fetched_at_the_digest_upstream_named(env):
    watch, fake, fetched, _ = env
    watch.folder.store.set_tag("docker.io", REPO, "3.12", OLD)
    fake.answers.append(answer(digest=NEW))
    await watch.round()
    assert fetched == [(f"docker.io/{REPO}:3.12", NEW)]
    written = watch.folder.store.directory / "watch.json"
    assert read_state(written.parent)["tags"][0]["digest"] == NEW and written.stat().st_mode & 0o777 == 0o600
    assert watch.metrics.registry.get_sample_value("hubcache_watch_checks_total", {"registry": "docker.io"}) == 1


async def test_a_registry_that_asks_for_a_token_gets_one_and_the_head_is_repeated_with_it(env):
    watch, fake, fetched, _ = env
    challenge = f'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:{REPO}:pull"'
    fake.answers += [
        http.Response.make(401, b"", {"WWW-Authenticate": challenge}),
        http.Response.make(200, b'{"token": "t0k"}', {}),
        answer(digest=NEW),
    ]
    await watch.round()
    first, token, again = fake.sent
    assert first.method == "HEAD" and "authorization" not in first.headers
    assert token.host == token.host_header == "auth.docker.io" and token.query["scope"] == f"repository:{REPO}:pull"
    assert again.method == "HEAD" and again.headers["authorization"] == "Bearer t0k"
    assert fetched == [(f"docker.io/{REPO}:3.12", NEW)]


async def test_nothing_is_asked_while_the_registrys_circuit_is_open(env):
    watch, fake, fetched, _ = env
    watch.circuits.failed(http.Request.make("HEAD", f"https://registry-1.docker.io/v2/{REPO}/manifests/3.12"), "refused")
    await watch.round()
    assert fake.sent == [] and fetched == []
    assert watch.states[f"docker.io/{REPO}:3.12"].state == "paused: upstream down"


async def test_nothing_is_asked_offline(env):
    watch, fake, _, tctx = env
    tctx.options.update(offline=True)
    await watch.round()
    assert fake.sent == []


def test_watch_rate_caps_the_bytes_per_second(monkeypatch):
    from hubcache.prefetch import watch as module

    clock = [100.0]
    waits: list[float] = []
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(module.time, "sleep", waits.append)
    throttle = Throttle(1_000_000, [])
    for _ in range(5):
        throttle.advance("blob", 1_000_000)  # five seconds' worth at once
    assert waits == [1.0, 2.0, 3.0, 4.0] and throttle.bytes == 5_000_000  # the first second goes at once
    assert Throttle(0, []).advance("blob", 10**9) is None and len(waits) == 4  # no cap, no wait


async def test_few_pulls_left_leaves_a_moved_tag_for_later_and_says_so_once(env, caplog):
    watch, fake, fetched, tctx = env
    tctx.options.update(watch=["python:3.12", "python:3.13"])
    few = {"ratelimit-remaining": "3;w=21600", "ratelimit-limit": "100;w=21600"}
    fake.answers += [answer(**few) for _ in range(4)]
    await watch.round()
    await watch.round()
    assert len(fake.sent) == 4 and fetched == []
    said = [r.message for r in caplog.records]
    assert said.count("hubcache: watch: docker.io has 3 pulls left; watch fetches wait until it has more") == 1
    fake.answers += [answer(**{"ratelimit-remaining": "90;w=21600", "ratelimit-limit": "100;w=21600"}) for _ in range(2)]
    await watch.round()
    assert len(fetched) == 2


async def test_a_pattern_is_expanded_through_tags_list(env):
    watch, fake, fetched, tctx = env
    tctx.options.update(watch=["python:3.1?"], watch_tag_limit=2)
    fake.answers += [http.Response.make(200, b'{"tags": ["3.10", "3.11", "3.12", "latest"]}', {}), answer(), answer()]
    await watch.round()
    assert [r.path for r in fake.sent] == [f"/v2/{REPO}/tags/list", f"/v2/{REPO}/manifests/3.12", f"/v2/{REPO}/manifests/3.11"]
    assert [image for image, _ in fetched] == [f"docker.io/{REPO}:3.12", f"docker.io/{REPO}:3.11"]


def test_the_watchs_mark_needs_the_secret_and_never_travels(env):
    from mitmproxy.test import tflow

    from hubcache.mitm.flows import Mark

    watch = env[0]
    guessed, odd, own = tflow.tflow(), tflow.tflow(), tflow.tflow()
    guessed.request.headers["hubcache-watch"] = "guess"
    odd.request.headers["hubcache-watch"] = "é\udcff" + watch.secret
    own.request.headers["hubcache-watch"] = watch.secret
    for flow in (guessed, odd, own):
        watch.requestheaders(flow)
        assert "hubcache-watch" not in flow.request.headers
    assert Mark.WATCH not in guessed.metadata and Mark.WATCH not in odd.metadata and own.metadata[Mark.WATCH]


async def test_nothing_is_asked_while_the_store_is_in_the_last_tenth_of_its_limit(env):
    watch, fake, _, _ = env
    writer = watch.folder.store.blob_writer("sha256:" + hashlib.sha256(b"x" * 95).hexdigest())
    writer.write(b"x" * 95)
    writer.commit()
    watch.upkeep.limit = 100
    await watch.round()
    assert fake.sent == []
    assert watch.states[f"docker.io/{REPO}:3.12"].state == "paused: store nearly full"


def test_the_config_file_takes_a_watch_list(tmp_path):
    from mitmproxy.addons.proxyserver import Proxyserver

    from hubcache.addons import make_addons
    from hubcache.cli.config import config_settings

    config = tmp_path / "config.yaml"
    config.write_text("watch:\n  - python:3.12\n  - ghcr.io/org/base:latest@linux/amd64,linux/arm64\nwatch_interval: 600\n")
    with taddons.context(Proxyserver(), *make_addons()) as tctx:
        tctx.options.set(*config_settings(config))
        assert tctx.options.watch == ["python:3.12", "ghcr.io/org/base:latest@linux/amd64,linux/arm64"]
        assert tctx.options.watch_interval == 600


class FakeLock:
    """The fleet lock as Redis holds it: the first to ask for a key has it."""

    def __init__(self) -> None:
        self.held: set[str] = set()

    def acquire(self, key: str, ttl: float) -> bool:
        if key in self.held:
            return False
        self.held.add(key)
        return True


async def test_in_a_fleet_one_node_checks_each_entry_per_interval(env):
    watch, fake, _, _ = env
    lock = FakeLock()
    watch.fleet.store, watch.fleet.lock = object(), lock  # fleet mode, as far as claim_watch sees it
    fake.answers += [answer(digest=NEW)]
    await watch.round()
    await watch.round()  # as another node would in the same interval: the lock is held
    assert len(fake.sent) == 1 and lock.held == {"watch:docker.io/library/python:3.12"}
    assert watch.states[f"docker.io/{REPO}:3.12"].state == "checked by another node"


def test_a_client_pull_of_a_digest_the_watch_fetched_is_counted_once_per_tag_request(env):
    from mitmproxy.test import tflow

    from hubcache.mitm.flows import Mark

    watch = env[0]
    watch._first = {NEW}

    def answered(reference: str, digest: str = NEW, *marks: Mark) -> http.HTTPFlow:
        flow = tflow.tflow(resp=True)
        flow.response.headers["docker-content-digest"] = digest
        flow.metadata[Mark.ANSWERED] = True
        flow.metadata[Mark.ROUTE] = ["manifest", "docker.io", REPO, reference, ""]
        for mark in marks:
            flow.metadata[mark] = True
        return flow

    for flow in (answered("3.12"), answered("3.12", OLD), answered(NEW), answered("3.12", NEW, Mark.WATCH)):
        watch.response(flow)
    assert watch.metrics.registry.get_sample_value("hubcache_watch_served_first_total", {"registry": "docker.io"}) == 1
