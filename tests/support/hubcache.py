"""Runs hubcache the way users do: a real `mitmdump -s addon/script.py` process on loopback."""

from __future__ import annotations

import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

from hubcache.cli.ca import make_ca
from hubcache.storage.journal import MissJournal

from .dockerhub import ALL_HOSTS as DOCKER_HUB_HOSTS
from .dockerhub import DockerHubDouble
from .pki import ca_bundle
from .procs import Proc, children_of, free_port, wait_for_port
from .registry import REGISTRY_NAME, Registry

ROOT = Path(__file__).resolve().parents[2]
MITMDUMP = Path(sys.executable).with_name("mitmdump")


def upstream_options(registry: Registry, dockerhub: DockerHubDouble) -> dict[str, list[str]]:
    """hubcache options that send the Docker Hub names to the double and REGISTRY_NAME to the registry."""
    mapping = [f"{h}=127.0.0.1:{dockerhub.port}" for h in DOCKER_HUB_HOSTS]
    mapping.append(f"{REGISTRY_NAME}=127.0.0.1:{registry.port}")
    return {"registries": ["registry-1.docker.io", "index.docker.io", REGISTRY_NAME], "upstream_map": mapping}


class Hubcache:
    """A hubcache proxy process. The content store and the CA survive restarts. The cache folder
    is `workdir`/cache unless the option `cache_dir` names another (another proxy's, say)."""

    def __init__(self, workdir: Path, upstream_ca: Path, options: dict[str, object] | None = None):
        self.workdir = workdir
        self.options = dict(options or {})
        # Passed once: mitmproxy refuses an option set twice (and hubcache then never starts).
        self.cache_dir = Path(str(self.options.pop("cache_dir", workdir / "cache")))
        self.confdir = workdir / "conf"
        self.upstream_ca = upstream_ca
        self.port = free_port()
        self.proc: Proc | None = None
        self.starts = 0
        self._bundle_lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ca_cert(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    @property
    def client_bundle(self) -> Path:
        """System CAs plus hubcache's CA: what a client's SSL_CERT_FILE points at. Written once:
        clients running at the same time must never read it half rewritten."""
        path = self.workdir / "client-bundle.pem"
        with self._bundle_lock:
            if not path.exists():
                ca_bundle([self.ca_cert], path)
        return path

    def start(self, **options: object) -> Hubcache:
        self.options.update(options)
        make_ca(self.confdir)  # as `hubcache run` makes it (mitmdump alone would make an RSA one)
        args = [
            str(MITMDUMP),
            "-s",
            str(ROOT / "addon" / "script.py"),
            "--listen-host",
            "127.0.0.1",
            "--listen-port",
            str(self.port),
            "--set",
            f"confdir={self.confdir}",
            "--set",
            f"cache_dir={self.cache_dir}",
            "--set",
            f"ssl_verify_upstream_trusted_ca={self.upstream_ca}",
            "--set",
            "status_listen=127.0.0.1:0",  # any free port: tests run many proxies at once
        ]
        for name, value in self.options.items():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                args += ["--set", f"{name}={str(item).lower() if isinstance(item, bool) else item}"]
        self.starts += 1
        log = self.workdir / f"mitmdump-{self.starts}.log"
        self.proc = Proc(args, log=log, cwd=self.workdir)
        wait_for_port("127.0.0.1", self.port, timeout=30, log=log)
        # mitmproxy listens before it has loaded the script: wait for the addon to be running,
        # its listeners included (the status page starts just after the blob server).
        ready = ["hubcache: blob server on"]
        if self.options.get("status_listen", "127.0.0.1:0"):
            ready.append("hubcache: status page on")
        deadline = time.monotonic() + 30
        while not all(line in self.proc.log_text(since_start=True) for line in ready):
            if time.monotonic() > deadline or not self.proc.alive():
                raise AssertionError(f"hubcache did not start:\n{self.proc.log_text(since_start=True)[-3000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def journal(self, settle: bool = True, timeout: float = 60.0) -> list[dict]:
        """The miss journal. With `settle`, once no fill is in progress (the proxy's own gauge):
        a fill is committed and journalled just after its clients had their last byte, and
        manifests are journalled before their answer is sent."""
        if settle and self.proc and self.proc.alive():
            deadline = time.monotonic() + timeout
            while (fills := self._fills_in_progress()) not in (0, None):
                assert time.monotonic() < deadline, f"{fills} fills still in progress after {timeout}s"
                time.sleep(0.05)
        return MissJournal(self.cache_dir / "misses.jsonl").entries()  # across its rotations

    def _fills_in_progress(self) -> int | None:
        """hubcache_fills_in_progress from /metrics; None without a status listener."""
        try:
            with urllib.request.urlopen(self.status_url + "metrics", timeout=10) as response:
                text = response.read().decode()
        except (AssertionError, OSError):
            return None
        found = re.search(r"^hubcache_fills_in_progress (\S+)$", text, re.MULTILINE)
        return int(float(found.group(1))) if found else None

    @property
    def status_url(self) -> str:
        """The status listener's base URL, as the proxy logged it."""
        found = re.search(r"status page on (http://\S+/)", self.proc.log_text(since_start=True) if self.proc else "")
        assert found, "the status listener is not on (or not started yet)"
        return found.group(1)

    def log_text(self) -> str:
        return self.proc.log_text() if self.proc else ""

    # Its processes: mitmdump, which answers the registry API, and the blob server it runs as a
    # child process (`python -m hubcache.blobserver.server`), which streams every blob.

    def blob_server_pid(self) -> int:
        """The pid of the blob server of this running proxy."""
        assert self.proc and self.proc.alive(), "the proxy is not running"
        for pid, _ in children_of(self.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"hubcache.blobserver.server" in argv:
                return pid
        raise AssertionError(f"mitmdump (pid {self.proc.pid}) runs no blob server")

    def memory_mb(self, field: str = "VmHWM") -> dict[str, float]:
        """A memory figure of /proc/<pid>/status in MiB (VmHWM: the peak resident set so far;
        VmRSS: the resident set now) for each process of this running proxy, by name."""
        assert self.proc
        return {"mitmdump": _status_mb(self.proc.pid, field), "blob server": _status_mb(self.blob_server_pid(), field)}


def _status_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")
