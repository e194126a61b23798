"""One client's share of the proxy's connections (option `client_connections`). mitmproxy keeps a
connection that says nothing for `tcp_timeout` (600 s), and each holds one of the proxy's file
descriptors: without a share, one client that opens connections and waits takes them all, and
with them every other client's pulls and the cache's own files. A client is its IPv4 address, or
its IPv6 /64 (one host is given a /64 to pick addresses from). This machine's own clients, which
connect from 127.0.0.1 or ::1 (its engines, the blob host's relay), have no share."""

from __future__ import annotations

import ipaddress
import logging

from mitmproxy import connection, ctx, exceptions
from mitmproxy.addonmanager import Loader

from ..blobserver.listeners import AddressShare, allow_files, client_of
from ..mitm import internals
from .destinations import plain

logger = logging.getLogger(__name__)

DEFAULT_SHARE = 256
OWN = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))  # where this machine's own clients come from
FILES = 65536  # the proxy's open files, if the hard limit allows: far above any one client's share


class ClientShare:
    def __init__(self) -> None:
        self._share = AddressShare(DEFAULT_SHARE, None, "connections to the proxy from")
        self._holding: dict[str, str] = {}  # a client connection's id: the client whose share it holds

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "client_connections",
            int,
            DEFAULT_SHARE,
            "Connections one client beyond this machine (an IPv4 address, an IPv6 /64) may hold open "
            "on the proxy and the mirror at once; its next ones are closed unanswered. 0: no limit.",
        )

    def configure(self, updated: set[str]) -> None:
        if "client_connections" in updated:
            share = ctx.options.client_connections
            if share < 0:
                raise exceptions.OptionsError(f"client_connections: {share} is not 0 or more")
            self._share.share = share or None

    def running(self) -> None:
        # A connection mitmproxy has let go of must not stay open outside every share.
        internals.close_cancelled_connections()
        try:
            allow_files(FILES)
        except (ValueError, OSError) as e:
            logger.warning(f"hubcache: cannot raise the proxy's limit of open files: {e}")

    def client_connected(self, client: connection.Client) -> None:
        who = _remote(client)
        if who is None:
            return
        if not self._share.take(who, wait=False):
            client.error = f"{who} holds {self._share.share} connections already"  # mitmproxy closes it
            return
        self._holding[client.id] = who

    def client_disconnected(self, client: connection.Client) -> None:
        if (who := self._holding.pop(client.id, None)) is not None:
            self._share.give_back(who)


def _remote(client: connection.Client) -> str | None:
    """Who the client is for its share (`client_of`: its IPv4 address or IPv6 /64); None from
    this machine."""
    try:
        address = plain(ipaddress.ip_address(client.peername[0]))
    except (ValueError, IndexError, TypeError):
        return None  # not an IP connection
    if address in OWN:
        return None
    return client_of(str(address))
