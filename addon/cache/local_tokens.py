"""Local tokens: what hubcache hands a client as its registry token while the registry's token host
cannot answer. Signed with a secret of this process, counted only at that token host's registries
and only until it answers again; anything else is an ordinary credential, sent upstream."""

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
        own tokens is relayed, never answered with a local token: cache/hooks.py.)"""
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
