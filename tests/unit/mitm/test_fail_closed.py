"""A hook of hubcache's that fails on a request ends it (fail_closed.py): mitmproxy alone would log
the traceback, skip the later addons' hooks and send the client's request upstream as it came."""

from __future__ import annotations

import logging

import pytest
from mitmproxy import connection
from mitmproxy.proxy import server_hooks
from mitmproxy.proxy.layers import http as http_layer
from mitmproxy.test import taddons, tflow

from hubcache.addons import make_addons
from hubcache.mitm.fail_closed import CONNECTION_HOOKS, REQUEST_HOOKS, fail_closed


class Failing:
    """An addon whose deciding hooks fail, one sync and one async."""

    def requestheaders(self, flow) -> None:
        raise KeyError("a bug")

    async def request(self, flow) -> None:
        raise RuntimeError("another bug")

    async def server_connect(self, data) -> None:
        raise ValueError("a third")


class After:
    """An addon after the failing one: sees what the failure left."""

    def __init__(self) -> None:
        self.seen: list[int | None] = []

    def requestheaders(self, flow) -> None:
        self.seen.append(flow.response.status_code if flow.response else None)


@pytest.mark.parametrize("hook", [http_layer.HttpRequestHeadersHook, http_layer.HttpRequestHook])
async def test_a_request_a_hook_fails_on_is_answered_500_and_goes_nowhere(hook, caplog):
    after = After()
    with taddons.context(*fail_closed([Failing(), after])) as tctx:
        flow = tflow.tflow()
        with caplog.at_level(logging.DEBUG):
            await tctx.master.addons.handle_lifecycle(hook(flow))
    assert flow.response is not None and flow.response.status_code == 500
    [error] = flow.response.json()["errors"]
    assert (error["code"], error["message"]) == ("UNKNOWN", "hubcache failed on this request")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None, "one line for the operator"
    assert "Failing." in errors[0].getMessage() and "bug" in errors[0].getMessage()
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records), "the traceback, at debug"
    if hook is http_layer.HttpRequestHeadersHook:
        assert after.seen == [500], "the addons after it see the request answered"


async def test_a_server_connection_a_hook_fails_on_is_refused():
    with taddons.context(*fail_closed([Failing()])) as tctx:
        data = server_hooks.ServerConnectionHookData(server=connection.Server(address=("registry.test", 443)), client=tflow.tclient_conn())
        await tctx.master.addons.handle_lifecycle(server_hooks.ServerConnectHook(data))
    assert data.server.error and "Failing.server_connect" in data.server.error


async def test_a_hook_that_does_not_fail_is_untouched():
    after = After()
    with taddons.context(*fail_closed([after])) as tctx:
        flow = tflow.tflow()
        await tctx.master.addons.handle_lifecycle(http_layer.HttpRequestHeadersHook(flow))
    assert after.seen == [None] and flow.response is None


def test_every_deciding_hook_of_hubcache_fails_closed():
    wrapped = set()
    for addon in make_addons():
        for name in REQUEST_HOOKS + CONNECTION_HOOKS:
            if hook := getattr(addon, name, None):
                assert getattr(hook, "__wrapped__", None) is not None, f"{type(addon).__name__}.{name} fails open"
                wrapped.add(f"{type(addon).__name__}.{name}")
    assert {"Routes.requestheaders", "ImagePolicy.request", "RegistryCache.request", "Destinations.server_connect"} <= wrapped
