"""The answers of recent anonymous `/v2/` version checks, by registry. Clients check before every
pull (skopeo on a new connection each time), and a check without credentials gets the same answer
whoever sends it: for `MEMORY` seconds the next one is answered from here, without a round trip
upstream. A check that carries credentials (`docker login` verifies them this way) always goes
upstream, and neither it nor its answer is ever kept or given to anyone else."""

from __future__ import annotations

import time
from collections.abc import Callable

from mitmproxy import http

from ..mitm.answers import Serve

MEMORY = 30.0  # seconds an anonymous answer is given again
REGISTRIES = 256  # answers kept at most (one per registry host and port)
MAX_BODY = 4096  # a larger answer is not a version check's: not kept
KEPT_STATUS = (200, 401)  # "this is a registry", and "this is a registry, ask for a token"
# Only what a version check says; every other header (cookies, caching, tracing) stays with the
# one answer it came on.
KEPT_HEADERS = ("content-type", "docker-distribution-api-version", "www-authenticate")


class RecentPings:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._answers: dict[tuple[str, int], tuple[float, Serve]] = {}

    def answer(self, request: http.Request) -> Serve | None:
        """Upstream's recent answer to an anonymous check like `request`, if it is one."""
        if not anonymous(request) or (kept := self._answers.get(_key(request))) is None:
            return None
        learned, answer = kept
        return answer if self._clock() - learned < MEMORY else None

    def learn(self, request: http.Request, response: http.Response) -> None:
        """Keep upstream's answer to the check `request`, if anyone else may be given it."""
        body = response.raw_content or b""
        if (
            request.method != "GET"  # a HEAD's answer has no body: not the one a GET gets
            or not anonymous(request)
            or response.status_code not in KEPT_STATUS
            or "set-cookie" in response.headers
            or response.headers.get("content-encoding", "identity").lower() != "identity"
            or len(body) > MAX_BODY
        ):
            return
        headers = {name: value for name in KEPT_HEADERS if (value := response.headers.get(name)) is not None}
        headers["Content-Length"] = str(len(body))
        key = _key(request)
        self._answers.pop(key, None)
        if len(self._answers) >= REGISTRIES:
            del self._answers[next(iter(self._answers))]  # the one learned longest ago
        self._answers[key] = (self._clock(), Serve(response.status_code, body, headers))


def anonymous(request: http.Request) -> bool:
    """Whether a check carries no credentials (hubcache forwards no cookies: upstream.FORWARDED)."""
    return "authorization" not in request.headers


def _key(request: http.Request) -> tuple[str, int]:
    return request.host.lower(), request.port
