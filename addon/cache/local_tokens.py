"""Local tokens: what hubcache hands a client as its registry token when the registry's token host
cannot answer (cache.py), so the client can finish its auth flow and pull cached public content.

A request carrying a local token is answered from the cache without asking upstream (which would
not know the token), so the token must be hubcache's own and the outage real:
- it is signed: an HMAC, keyed by a secret this process draws at start and never writes down,
  over when it was issued and the token host it stands in for;
- it counts only at a registry whose token host that is, for `LOCAL_TOKEN_SECONDS` (the lifetime
  the client is told), and only until that token host answers a token request again.

Anything else, the bare word `hubcache-local` included, is an ordinary credential: it goes
upstream like any other, which refuses it, and the client asks for a token again.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from ..registry.protocol import LOCAL_TOKEN_SECONDS
from ..registry.settings import AUTH_HOSTS

PREFIX = "hubcache-local"


class LocalTokens:
    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._answered: dict[str, int] = {}  # token host -> when it last answered (ms since the epoch)

    def issue(self, host: str, now: float | None = None) -> str:
        """A token standing in for `host`'s, issued now (or at `now`, seconds since the epoch)."""
        issued = int((time.time() if now is None else now) * 1000)
        host = host.lower()
        return f"{PREFIX}.{issued}.{self._mac(issued, host)}.{host}"

    def answered(self, host: str) -> None:
        """`host` answered a token request: it is back, and the tokens issued for it before are void."""
        self._answered[host.lower()] = int(time.time() * 1000)

    def honoured(self, authorization: str, registry: str) -> bool:
        """Whether `authorization` holds a local token of this process, for the token host of the
        registry API host `registry`, that still stands in for it. (A registry that serves its
        own tokens is relayed, never answered with a local token: cache.py.)"""
        scheme, _, token = authorization.strip().partition(" ")
        prefix, _, rest = token.partition(".")
        issued_text, _, rest = rest.partition(".")
        mac, _, host = rest.partition(".")
        if not token.isascii() or scheme.lower() != "bearer" or prefix != PREFIX or not issued_text.isdigit():
            return False  # (compare_digest takes ASCII only)
        issued = int(issued_text)
        if not hmac.compare_digest(mac, self._mac(issued, host)):
            return False
        now = int(time.time() * 1000)
        return (
            host == AUTH_HOSTS.get(registry.lower())
            and issued <= now < issued + LOCAL_TOKEN_SECONDS * 1000
            and self._answered.get(host, -1) < issued
        )

    def _mac(self, issued: int, host: str) -> str:
        return hmac.new(self._key, f"{issued}|{host}".encode(), hashlib.sha256).hexdigest()
