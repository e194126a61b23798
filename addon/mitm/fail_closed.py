"""A hook of hubcache's that fails on a request ends that request. mitmproxy alone logs the
traceback, skips the hooks of the addons after the failed one for that event, and carries on: the
request would then go upstream as the client wrote it, past a route, an access check or a policy
that never ran. `fail_closed` wraps the hooks that decide where a request goes: a request's
(`http_connect`, `requestheaders`, `request`) answer `500 UNKNOWN`, a server connection's
(`server_connect`) is refused. Each failure is one line in the log; its traceback is logged at
debug level."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.proxy import server_hooks

from ..registry import protocol
from . import answers

logger = logging.getLogger(__name__)

REQUEST_HOOKS = ("http_connect", "requestheaders", "request")
CONNECTION_HOOKS = ("server_connect",)


def fail_closed(addons: list) -> list:
    """`addons`, each with its deciding hooks wrapped."""
    for addon in addons:
        for name in REQUEST_HOOKS + CONNECTION_HOOKS:
            if (hook := getattr(addon, name, None)) is not None:
                setattr(addon, name, _wrapped(f"{type(addon).__name__}.{name}", hook))
    return addons


def _wrapped(where: str, hook: Callable[[Any], Any]) -> Callable[[Any], Any]:
    # mitmproxy awaits what a hook returns only if it is awaitable: a sync hook stays sync.
    if inspect.iscoroutinefunction(hook):

        @functools.wraps(hook)
        async def closing(subject: Any) -> None:
            try:
                await hook(subject)
            except Exception as e:
                _close(where, subject, e)

        return closing

    @functools.wraps(hook)
    def closing_sync(subject: Any) -> None:
        try:
            hook(subject)
        except Exception as e:
            _close(where, subject, e)

    return closing_sync


def _close(where: str, subject: http.HTTPFlow | server_hooks.ServerConnectionHookData, error: Exception) -> None:
    why = f"{type(error).__name__}: {error}"[:300]
    if isinstance(subject, http.HTTPFlow):
        request = subject.request
        logger.error(f"hubcache: {where} failed on {request.method} {request.pretty_host}{request.path[:200]}: {why}; answered 500")
        answers.error(subject, protocol.ErrorCode.INTERNAL, "hubcache failed on this request")
    else:
        logger.error(f"hubcache: {where} failed on a connection to {subject.server.address}: {why}; not connected")
        subject.server.error = f"hubcache: {where} failed"
    logger.debug(f"hubcache: {where}", exc_info=error)
