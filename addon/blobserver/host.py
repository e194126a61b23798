"""Runs the blob server process (`server.py`) beside the proxy and sends clients to it: a 307 to a
signed URL on loopback (`http://127.0.0.1:PORT/...`), on an address of this machine that clients
on other machines reach directly (`blob_listen`), or through the proxy
(`https://blobs.hubcache.invalid/...`, routed here, never intercepted), as `blob_urls` chooses. The
server's TLS key is its own, certified by mitmproxy's CA and handed over in memory only."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from mitmproxy import certs, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import server_hooks

from ..units import decimal
from . import server as blobserver
from .server import BLOB_HOST

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # names of this machine that only it dials
CERT_DAYS = 397  # the longest life clients accept for a leaf certificate
RESTART_PAUSE = 10.0  # seconds: a blob server that exits this soon after a restart waits this long for the next
INLINE_MAX = 64 * 1024  # default bytes of a blob the proxy answers itself: an image's config, a small layer
INLINE_CAP = 1024 * 1024  # the proxy holds each such answer in memory


@dataclass
class MirrorListener:
    """The registry mirror's listener (proxy/mirror.py), as the addons that are not the mirror
    need to know it. Only `Mirror` sets it; make_addons hands the same one to each."""

    mode: str | None = None  # the mitmproxy mode it listens by (Interception tells its clients by it)
    # The blob server's HTTPS listener for the mirror's clients on other machines: its address
    # and the PEM certificate and key it presents; None: the mirror needs none.
    blob_tls: tuple[str, bytes] | None = None


class BlobHost:
    def __init__(self, certstore: Callable[[], certs.CertStore], mirror: MirrorListener | None = None) -> None:
        self.certstore = certstore  # mitmproxy's, whose CA signs the blob host's certificate
        self.mirror = mirror or MirrorListener()
        self.secret = os.urandom(32)  # per run: URLs never outlive the proxy that signed them
        self.address: tuple[str, int] | None = None  # the HTTPS listener
        self.loopback_port: int | None = None  # the plain HTTP listener
        self.tunnel_port: int | None = None  # the HTTPS listener behind a CONNECT
        self.mirror_port: int | None = None  # the HTTPS listener for a mirror's clients on other machines
        self.direct: tuple[str, int] | None = None  # (address as clients name it, port) of the blob_listen listener
        self._proc: subprocess.Popen | None = None
        self._cache_dir: Path | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restarted = -RESTART_PAUSE  # when the blob server was last started again (monotonic)
        self._exited_proc: subprocess.Popen | None = None  # the server that exited, until restarted
        # Called with (tag, bytes) for every finished transfer, from the reader thread.
        self.on_sent: list[Callable[[str, int], None]] = []

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "blob_urls",
            str,
            "auto",
            "Where blob GETs are redirected: 'loopback' (plain HTTP on 127.0.0.1, for clients on "
            "this machine: fastest), 'https' (for clients anywhere: on blob_listen's address, which "
            "clients reach directly, else through the proxy), or 'auto' (loopback when the proxy "
            "listens on loopback only).",
            choices=("auto", "loopback", "https"),
        )
        loader.add_option(
            "blob_listen",
            str,
            "",
            "ADDRESS[:PORT] of this machine where clients on other machines fetch blobs directly over "
            "HTTPS when blob URLs are https (their NO_PROXY must name ADDRESS: see `hubcache setup`); "
            "empty: the proxy's listen host when it is one address beyond loopback, any free port; "
            "'relay': none, blobs are relayed through the proxy.",
        )
        loader.add_option(
            "blob_inline_max",
            int,
            INLINE_MAX,
            "Bytes: a blob in the store of at most this size (an image's config, a small layer) is "
            "answered by the proxy itself, hashed again first, instead of redirected to the blob "
            "server, so that its client saves a connection and its round trips. 0: every blob is "
            f"redirected; at most {INLINE_CAP} (the proxy holds each such answer in memory).",
        )
        loader.add_option(
            "blob_head_timeout",
            int,
            int(blobserver.HEAD_TIMEOUT),
            "Seconds a client of the blob server has, from its connection (or the end of its "
            "previous answer), for its TLS handshake and request head, however slowly it sends them.",
        )
        loader.add_option(
            "blob_min_rate",
            int,
            blobserver.MIN_RATE,
            "Bytes per second a client of the blob server must read its blob at (each part of it, "
            f"with {blobserver.GRACE:g}s of grace); a slower one is cut and may resume with a Range.",
        )

    @property
    def restarting(self) -> bool:
        """The blob server exited and is being started again."""
        return self._exited_proc is not None

    def ports(self) -> list[int]:
        """The blob server's listening ports (for `Destinations`: never reachable through the proxy)."""
        return [port for port in (self.address and self.address[1], self.loopback_port, self.tunnel_port) if port]

    def url(self, digest: str, fill: str = "", size: int = 0, tag: str = "") -> str:
        """A signed URL of the blob (of a fill in progress: its file and size); the blob server
        reports the transfers of a URL with a tag to `on_sent`."""
        path = blobserver.signed_path(self.secret, digest, fill, size, tag)
        if self.loopback_port and self._loopback():
            return f"http://127.0.0.1:{self.loopback_port}{path}"
        if self.direct:
            return f"https://{_url_host(self.direct[0])}:{self.direct[1]}{path}"
        return f"https://{BLOB_HOST}{path}"

    def is_direct(self, host: str, port: int) -> bool:
        """Whether host:port names the blob_listen listener (a client sending its URL through the proxy)."""
        return self.direct is not None and port == self.direct[1] and host.lower().strip("[]") == self.direct[0].lower()

    @staticmethod
    def _loopback() -> bool:
        if ctx.options.blob_urls == "auto":
            return ctx.options.listen_host in LOOPBACK_HOSTS
        return ctx.options.blob_urls == "loopback"

    def running(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start()

    def configure(self, updated: set[str]) -> None:
        for name in ("blob_head_timeout", "blob_min_rate"):
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"{name} must be 1 or more")
        if "blob_inline_max" in updated and not 0 <= ctx.options.blob_inline_max <= INLINE_CAP:
            raise exceptions.OptionsError(f"blob_inline_max must be 0 to {INLINE_CAP} bytes")
        if "blob_listen" in updated and ctx.options.blob_listen not in ("", "relay"):
            try:
                parse_blob_listen(ctx.options.blob_listen)
            except ValueError:
                raise exceptions.OptionsError(
                    f"blob_listen: {ctx.options.blob_listen!r} is not ADDRESS[:PORT] (e.g. 10.0.0.5 or 10.0.0.5:5001), '' or 'relay'"
                ) from None
        moved = "cache_dir" in updated and self._cache_dir != self._wanted_dir().resolve()
        listeners = {"client_idle_timeout", "blob_head_timeout", "blob_min_rate", "blob_listen", "blob_urls", "listen_host"}
        if self._proc and (moved or updated & listeners):
            self._start()

    def done(self) -> None:
        self._stop()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """A loopback blob URL sent through the proxy goes to the blob host instead (see above)."""
        request = flow.request
        if (
            not flow.response
            and request.scheme == "http"
            and self.loopback_port
            and request.port == self.loopback_port
            and request.host.lower().strip("[]") in LOOPBACK_HOSTS
            and request.path.startswith("/blobs/")
            and request.method in ("GET", "HEAD")
        ):
            flow.response = http.Response.make(307, b"", {"Location": f"https://{BLOB_HOST}{request.path}"})

    def http_connect(self, flow: http.HTTPFlow) -> None:
        """In upstream proxy mode mitmproxy opens a client's tunnel through the upstream proxy,
        which cannot reach the blob host: name the blob server's CONNECT listener as the proxy
        of this tunnel instead."""
        if flow.request.host.lower() == BLOB_HOST and flow.server_conn.via and self.tunnel_port:
            flow.server_conn.via = ("http", ("127.0.0.1", self.tunnel_port))

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address and data.server.address[0].lower() == BLOB_HOST:
            if self.address is None:
                data.server.error = "hubcache's blob server is not running"
                return
            data.server.address = self.address
            data.server.via = None  # loopback: never through an upstream proxy
        elif data.server.address and self.is_direct(*data.server.address):
            data.server.via = None  # this machine: never through an upstream proxy

    def restart(self) -> None:
        """Start the blob server again if it runs (its listeners changed: a mirror's)."""
        if self._proc:
            self._start()

    @staticmethod
    def _wanted_dir() -> Path:
        return Path(ctx.options.cache_dir).expanduser()

    def _start(self) -> None:
        self._stop()
        self._exited_proc = None
        self._cache_dir = self._wanted_dir().resolve()
        credentials = os.memfd_create("hubcache-blobhost")
        fds = [credentials]
        try:
            os.write(credentials, _certificate(self.certstore()))
            env = {**os.environ, blobserver.SECRET_ENV: self.secret.hex()}
            argv = [
                sys.executable, "-m", f"{__package__}.server",
                "--cache-dir", str(self._cache_dir),
                "--credentials-fd", str(credentials),
                "--idle-timeout", str(ctx.options.client_idle_timeout),
                "--head-timeout", str(ctx.options.blob_head_timeout),
                "--min-rate", str(ctx.options.blob_min_rate),
            ]
            direct = self._direct_listen()
            networks = [(*direct, _certificate(self.certstore(), direct[0]))] if direct else []
            if self.mirror.blob_tls:
                networks.append((self.mirror.blob_tls[0], 0, self.mirror.blob_tls[1]))
            for address, port, pem in networks:
                fds.append(fd := os.memfd_create("hubcache-network"))
                os.write(fd, pem)
                argv += ["--network", address, str(port), str(fd)]
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=tuple(fds))
        finally:
            for fd in fds:
                os.close(fd)
        assert self._proc.stdout
        sending, *words = self._proc.stdout.readline().decode().split() or [""]
        ports = [p for p in map(decimal, words) if p is not None]
        expected = 3 + bool(direct) + bool(self.mirror.blob_tls)
        if sending not in ("ktls", "userspace") or len(ports) != expected:
            self._stop()
            logger.error("hubcache: the blob server did not start; see its message above")
            return
        self.address = ("127.0.0.1", ports[0])
        self.loopback_port, self.tunnel_port = ports[1], ports[2]
        rest = ports[3:]
        self.direct = (direct[0], rest.pop(0)) if direct else None
        self.mirror_port = rest.pop(0) if self.mirror.blob_tls else None
        threading.Thread(target=self._read_reports, args=(self._proc, self._proc.stdout), daemon=True).start()
        also = f" and {_url_host(self.direct[0])}:{self.direct[1]} (https, for clients on other machines)" if self.direct else ""
        if self.mirror.blob_tls and self.mirror_port:
            also += f" and {self.mirror.blob_tls[0]}:{self.mirror_port} (https, for the mirror's clients)"
        how = (
            "kTLS offered: where OpenSSL enables it, the kernel encrypts and blobs go by sendfile"
            if sending == "ktls"
            else "TLS in process, 1 MiB writes from a reused buffer (this kernel offers no kTLS)"
        )
        logger.info(f"hubcache: blob server on 127.0.0.1:{ports[0]} (https) and :{ports[1]} (loopback http){also}; {how}")

    def _direct_listen(self) -> tuple[str, int] | None:
        """Where the blob_listen listener goes (address, port; 0: any), if blob URLs are https."""
        return None if self._loopback() else direct_listen(ctx.options.blob_listen, ctx.options.listen_host)

    def _read_reports(self, proc: subprocess.Popen, reports: IO[bytes]) -> None:
        for line in reports:
            word, tag, sent = (line.decode().split() + ["", "", ""])[:3]
            if word == "sent" and (size := decimal(sent)) is not None:
                for listener in self.on_sent:
                    listener(tag, size)
        # Its output ended: the server exited. Unless the proxy stopped it, start it again.
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._exited, proc)
            except RuntimeError:
                pass  # the loop closed meanwhile: hubcache is exiting

    def _exited(self, proc: subprocess.Popen) -> None:
        if proc is not self._proc:
            return  # stopped on purpose, or replaced already
        status = proc.wait()
        # One that dies again soon after it was started again waits a pause: no restart loop.
        delay = 0.0 if time.monotonic() - self._restarted > RESTART_PAUSE else RESTART_PAUSE
        logger.warning(f"hubcache: the blob server exited (status {status}); starting it again" + (f" in {delay:g}s" if delay else ""))
        self._exited_proc = proc  # clients get a registry error meanwhile
        assert self._loop
        self._loop.call_later(delay, self._restart, proc)

    def _restart(self, proc: subprocess.Popen) -> None:
        if proc is self._proc:
            self._restarted = time.monotonic()
            self._start()

    def _stop(self) -> None:
        self.address = self.loopback_port = self.tunnel_port = self.mirror_port = self.direct = None
        if self._proc:
            assert self._proc.stdin
            self._proc.stdin.close()  # the server exits at EOF
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def direct_listen(blob_listen: str, listen_host: str) -> tuple[str, int] | None:
    """Where clients on other machines fetch blobs directly (address, port; 0: any free one), from
    the options `blob_listen` and `listen_host`; None: relayed through the proxy. (Also what
    `hubcache setup` names in NO_PROXY.)"""
    if blob_listen == "relay":
        return None
    if blob_listen:
        return parse_blob_listen(blob_listen)
    host = listen_host.strip("[]")
    if host in LOOPBACK_HOSTS or host in ("", "0.0.0.0", "::"):
        return None  # every address, or this machine's own clients only: no one address to name
    return host, 0


def parse_blob_listen(value: str) -> tuple[str, int]:
    """`ADDRESS[:PORT]` (IPv6 in brackets) -> (address, port; 0 if none); ValueError if it is not one."""
    if value.startswith("["):
        address, bracket, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("0" if bracket and not rest else "-")
    elif value.count(":") == 1:
        address, _, port = value.partition(":")
    else:
        address, port = value, "0"  # an IPv6 address without brackets, or a name: any port
    number = decimal(port)
    if not address or any(c in address for c in "/@ []") or number is None or number >= 65536:
        raise ValueError(value)
    return address, number


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _certificate(certstore: certs.CertStore, name: str = BLOB_HOST) -> bytes:
    """A fresh key and a certificate for `name` (the blob host, or an address of this machine)
    signed by mitmproxy's CA, as one PEM."""
    ca = certstore.default_ca.to_cryptography()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    try:
        alternative: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        alternative = x509.DNSName(name)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([alternative]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # A CA key signs; cryptography annotates the parameter with fewer key types than public_key() returns.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(cast(Any, ca.public_key())), critical=False)
        .sign(certstore.default_privatekey, hashes.SHA256())
    )
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM) + private
