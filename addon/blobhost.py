"""Runs the blob server process (`addon/blobserver.py`) beside the proxy and sends clients to it.

Blob GETs are answered with a 307 to `https://blobs.hubcache.invalid/blobs/<digest>?<signature>`.
Clients open that through the proxy like any other host: the connection is not intercepted
(mitmproxy relays it as raw TCP) and `server_connect` routes it to the blob server on loopback,
never through an upstream proxy. Its certificate comes from mitmproxy's CA, which clients trust.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import ctx
from mitmproxy.proxy import server_hooks

from . import blobserver
from .blobserver import BLOB_HOST

logger = logging.getLogger(__name__)


class BlobHost:
    def __init__(self) -> None:
        self.secret = os.urandom(32)  # per run: URLs never outlive the proxy that signed them
        self.address: tuple[str, int] | None = None
        self._proc: subprocess.Popen | None = None
        self._keys: Path | None = None
        self._cache_dir: Path | None = None

    def url(self, digest: str, fill: str = "", size: int = 0) -> str:
        return f"https://{BLOB_HOST}{blobserver.signed_path(self.secret, digest, fill, size)}"

    def running(self) -> None:
        self._start()

    def configure(self, updated) -> None:
        if "cache_dir" in updated and self._proc and self._cache_dir != self._wanted_dir().resolve():
            self._start()

    def done(self) -> None:
        self._stop()

    def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        if data.server.address and data.server.address[0].lower() == BLOB_HOST:
            if self.address is None:
                data.server.error = "hubcache's blob server is not running"
                return
            data.server.address = self.address
            data.server.via = None  # loopback: never through an upstream proxy

    @staticmethod
    def _wanted_dir() -> Path:
        return Path(ctx.options.cache_dir).expanduser()

    def _start(self) -> None:
        self._stop()
        self._cache_dir = self._wanted_dir().resolve()
        self._keys = Path(tempfile.mkdtemp(prefix="hubcache-blobhost-"))
        cert, key = self._keys / "cert.pem", self._keys / "key.pem"
        entry = ctx.master.addons.get("tlsconfig").certstore.get_cert(BLOB_HOST, [x509.DNSName(BLOB_HOST)])
        cert.write_bytes(entry.cert.to_pem())
        key.write_bytes(
            entry.privatekey.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        package_root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            blobserver.SECRET_ENV: self.secret.hex(),
            "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "addon.blobserver", "--cache-dir", str(self._cache_dir), "--cert", str(cert), "--key", str(key)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert self._proc.stdout
        line = self._proc.stdout.readline().strip()
        if not line.isdigit():
            self._stop()
            logger.error("hubcache: the blob server did not start; see its message above")
            return
        self.address = ("127.0.0.1", int(line))
        logger.info(f"hubcache: blob server on 127.0.0.1:{line}")

    def _stop(self) -> None:
        self.address = None
        if self._proc:
            assert self._proc.stdin
            self._proc.stdin.close()  # the server exits at EOF
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._keys:
            shutil.rmtree(self._keys, ignore_errors=True)
            self._keys = None
