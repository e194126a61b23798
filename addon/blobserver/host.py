"""Runs the blob server process (`addon/blobserver.py`) beside the proxy and sends clients to it.

Blob GETs are answered with a 307 to a signed URL on the blob server, one of:
- `http://127.0.0.1:<port>/blobs/<digest>?<signature>` when the proxy listens on loopback only, so
  every client runs on this machine: the client connects directly (Go never proxies loopback),
  and the blob leaves the page cache by sendfile(2). This is as fast as pulling from a registry
  on the same machine, and the bytes never leave the host.
- `https://blobs.hubcache.invalid/blobs/<digest>?<signature>` otherwise: clients open it through
  the proxy like any host; it is not intercepted (mitmproxy relays it as raw TCP) and
  `server_connect` routes it to the blob server on loopback, never through an upstream proxy (in
  upstream proxy mode, `http_connect` names the blob server itself as the tunnel's proxy). Its
  certificate comes from mitmproxy's CA, which clients trust.
The option `blob_urls` chooses (`auto`, `loopback`, `https`).

A client that sends a loopback URL back through the proxy (a Python client with `HTTP_PROXY` set
proxies even loopback) is redirected to the same signed path on the blob host, so the bytes still
bypass mitmproxy's HTTP layer and the proxy's memory stays flat.

The blob server's TLS key is its own: a fresh key, certified by mitmproxy's CA, handed to the
process in an anonymous memory file (memfd). No key is ever written to disk, so none is left
behind by any exit; the CA's key never leaves mitmproxy's confdir.
"""

from __future__ import annotations

import asyncio
import datetime
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

from . import server as blobserver
from .server import BLOB_HOST

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")  # names of this machine that only it dials
CERT_DAYS = 397  # the longest life clients accept for a leaf certificate
RESTART_PAUSE = 10.0  # seconds: a blob server that exits this soon after a restart waits this long for the next


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
            "this machine: fastest), 'https' (through the proxy, for clients anywhere), or 'auto' "
            "(loopback when the proxy listens on loopback only).",
            choices=("auto", "loopback", "https"),
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
        return f"https://{BLOB_HOST}{path}"

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
        moved = "cache_dir" in updated and self._cache_dir != self._wanted_dir().resolve()
        if self._proc and (moved or updated & {"client_idle_timeout", "blob_head_timeout", "blob_min_rate"}):
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
            if self.mirror.blob_tls:
                address, pem = self.mirror.blob_tls
                fds.append(mirror := os.memfd_create("hubcache-mirror"))
                os.write(mirror, pem)
                argv += ["--mirror-address", address, "--mirror-credentials-fd", str(mirror)]
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, pass_fds=tuple(fds))
        finally:
            for fd in fds:
                os.close(fd)
        assert self._proc.stdout
        ports = self._proc.stdout.readline().decode().split()
        if len(ports) != 4 or not all(p.isdigit() for p in ports):
            self._stop()
            logger.error("hubcache: the blob server did not start; see its message above")
            return
        self.address = ("127.0.0.1", int(ports[0]))
        self.loopback_port = int(ports[1])
        self.tunnel_port = int(ports[2])
        self.mirror_port = int(ports[3]) or None
        threading.Thread(target=self._read_reports, args=(self._proc, self._proc.stdout), daemon=True).start()
        mirror_tls = self.mirror.blob_tls
        for_mirror = f" and {mirror_tls[0]}:{ports[3]} (https, for the mirror's clients)" if mirror_tls and self.mirror_port else ""
        logger.info(f"hubcache: blob server on 127.0.0.1:{ports[0]} (https) and :{ports[1]} (loopback http){for_mirror}")

    def _read_reports(self, proc: subprocess.Popen, reports: IO[bytes]) -> None:
        for line in reports:
            word, tag, sent = (line.decode().split() + ["", "", ""])[:3]
            if word == "sent" and sent.isdigit():
                for listener in self.on_sent:
                    listener(tag, int(sent))
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
        self.address = self.loopback_port = self.tunnel_port = self.mirror_port = None
        if self._proc:
            assert self._proc.stdin
            self._proc.stdin.close()  # the server exits at EOF
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


def _certificate(certstore: certs.CertStore) -> bytes:
    """A fresh key and a certificate for the blob host signed by mitmproxy's CA, as one PEM."""
    ca = certstore.default_ca.to_cryptography()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, BLOB_HOST)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(BLOB_HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        # A CA key signs; cryptography annotates the parameter with fewer key types than public_key() returns.
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(cast(Any, ca.public_key())), critical=False)
        .sign(certstore.default_privatekey, hashes.SHA256())
    )
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM) + private
