"""The status page (addon/observe/status_page.py): which repositories it may name, with taddons; and
its listener's bounds, on a socket in this process."""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import make_server

import pytest
from mitmproxy import exceptions
from mitmproxy.test import taddons

from hubcache.fleet.node import Fleet
from hubcache.observe import status_page
from hubcache.observe.metrics import Metrics
from hubcache.observe.pull_log import PullLog
from hubcache.observe.status_page import PRIVATE, StatusPage
from hubcache.options import CommonOptions
from hubcache.prefetch.watch import Watch
from hubcache.proxy.interception import Interception
from hubcache.storage.eviction import Upkeep
from hubcache.storage.folder import CacheFolder
from hubcache.storage.journal import Outcome
from hubcache.upstream.circuits import Circuits
from hubcache.upstream.client import Upstream
from support.slowclients import ask_from


def test_only_repositories_known_to_be_public_are_named(tmp_path):
    """docs/operating.md: private repositories, and those whose visibility is not known yet, are shown as
    (private) unless status_private is on."""
    hosts = Interception()
    folder = CacheFolder()
    metrics = Metrics(hosts)
    page = StatusPage(folder, metrics, PullLog(), Watch(hosts, folder, Circuits(hosts, metrics), Fleet(), Upkeep(folder), metrics, Upstream()))
    with taddons.context(CommonOptions(), folder, hosts, page) as tctx:
        tctx.options.update(cache_dir=str(tmp_path))
        assert folder.store and folder.journal
        folder.store.set_visibility("docker.io", "library/public", True)
        folder.store.set_visibility("docker.io", "acme/private", False)
        for repository in ("library/public", "acme/private", "acme/unknown"):
            folder.journal.record(registry="docker.io", repository=repository, reference="1", outcome=Outcome.FILLED, kind="manifest")

        def named() -> list[str]:
            return [entry["repository"] for entry in page.status()["recent_misses"]]

        assert named() == [PRIVATE, PRIVATE, "library/public"], "newest first; the unknown one is not named"
        tctx.options.update(status_private=True)
        assert named() == ["acme/unknown", "acme/private", "library/public"]
        folder.done()


# The listener, as a client on another machine reaches it (status_listen beyond loopback).


def _answers(address, data: bytes, timeout: float = 20) -> bytes:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        return b"".join(iter(lambda: sock.recv(65536), b""))


@pytest.fixture
def listener(monkeypatch):
    """The status listener's server and handler on a port of its own, with a short head deadline
    and a long idle timeout (so only the deadline can free a slot)."""
    if status_page._Server.head_timeout is not None:
        monkeypatch.setattr(status_page._Server, "head_timeout", 1.0)
    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    server = make_server("127.0.0.1", 0, app, server_class=status_page._Server, handler_class=status_page._QuietHandler)
    server.idle_timeout = 120.0
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_heads_never_finished_do_not_keep_the_page_from_its_reader(listener):
    """Every connection taken by a client that sends half a head and waits (each would be kept for
    client_idle_timeout): the head deadline frees them for a normal request."""
    stuck = [socket.create_connection(listener.server_address, timeout=20) for _ in range(listener.max_connections)]
    try:
        for sock in stuck:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        try:
            answer = _answers(listener.server_address, b"GET / HTTP/1.0\r\n\r\n", timeout=15)
        except TimeoutError:
            pytest.fail("no answer while the stuck connections held every slot")
        assert answer.endswith(b"\r\n\r\nok")
        assert all(sock.recv(1) == b"" for sock in stuck), "each was cut without an answer"
    finally:
        for sock in stuck:
            sock.close()


def test_a_huge_head_is_refused_and_a_normal_one_answered(listener):
    answer = _answers(listener.server_address, b"GET / HTTP/1.0\r\n" + b"X-Big: " + b"b" * 60000 + b"\r\n" * 2)
    assert answer.startswith(b"HTTP/1.0 431 ")
    assert _answers(listener.server_address, b"GET / HTTP/1.0\r\n\r\n").endswith(b"\r\n\r\nok")


def page_of(hosts: Interception, folder: CacheFolder, metrics: Metrics) -> StatusPage:
    return StatusPage(folder, metrics, PullLog(), Watch(hosts, folder, Circuits(hosts, metrics), Fleet(), Upkeep(folder), metrics, Upstream()))


@pytest.mark.parametrize("bad", ["nohost", "127.0.0.1:", ":3129", "127.0.0.1:99999", "127.0.0.1:\u00b2", "127.0.0.1:" + "9" * 5000])
def test_a_bad_status_listen_is_one_readable_option_error(bad):
    hosts, folder = Interception(), CacheFolder()
    page = page_of(hosts, folder, Metrics(hosts))
    with taddons.context(CommonOptions(), folder, hosts, page) as tctx:
        try:
            tctx.configure(page, status_listen=bad)
        except exceptions.OptionsError as e:
            assert "is not ADDRESS:PORT" in str(e)
        except Exception as e:
            pytest.fail(f"{type(e).__name__} instead of an option error: {e}")
        else:
            pytest.fail(f"{bad[:30]!r} was taken")


def test_the_status_shows_the_event_loop_lag(tmp_path):
    """The longest lag of the event loop since start, and how many lags were over 50 ms."""
    hosts = Interception()
    folder = CacheFolder()
    metrics = Metrics(hosts)
    page = page_of(hosts, folder, metrics)
    with taddons.context(CommonOptions(), folder, hosts, page):
        assert page.status()["event_loop"] == {"longest_lag": 0.0, "stalls": 0}
        for lag in (0.2, 0.03, 0.06):
            metrics.loop_lagged(lag)
        assert page.status()["event_loop"] == {"longest_lag": 0.2, "stalls": 2}


def _ask_from(source: str, address) -> bytes:
    return ask_from(source, address, b"GET /metrics HTTP/1.0\r\n\r\n")


@pytest.mark.parametrize("listen, share", [("127.0.0.2:0", 4), ("127.0.0.1:0", None)])
async def test_on_a_network_address_one_client_holds_a_quarter_of_the_connections(listen, share, caplog):
    """A client that opens silent connections to a status listener beyond loopback holds 4 of its
    16; its next one is closed at once and the address logged, while another address's scraper is
    answered. On loopback, where every client has one address, there is no share."""
    hosts, folder = Interception(), CacheFolder()
    page = page_of(hosts, folder, Metrics(hosts))
    with taddons.context(CommonOptions(), folder, hosts, page) as tctx:
        tctx.configure(page, status_listen=listen)
        page.running()
        try:
            address = page._server.server_address
            held = [socket.create_connection(address, timeout=30, source_address=("127.0.0.3", 0)) for _ in range(4)]
            try:
                beyond = _ask_from("127.0.0.3", address)
                if share:
                    assert beyond == b"", "a connection beyond the address's share was served"
                    assert any("connections from 127.0.0.3 refused" in r.getMessage() for r in caplog.records)
                else:
                    assert beyond.startswith(b"HTTP/1.0 200"), "a loopback client was refused"
                assert _ask_from("127.0.0.4", address).startswith(b"HTTP/1.0 200"), "another address was kept waiting"
                held[0].sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                assert held[0].recv(1024).startswith(b"HTTP/1.0 200"), "a connection within the share is served"
            finally:
                for sock in held:
                    sock.close()
        finally:
            page.done()
