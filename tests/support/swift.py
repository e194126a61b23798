"""A real S3-compatible object store for tests: OpenStack Swift with its s3api middleware, on
loopback, in one folder.

Swift runs from its own virtual environment (`.venv-swift`, made by scripts/test), because its
pinned dependencies (eventlet, greenlet) have nothing to do with hubcache's. One replica, one
device, four processes (account, container, object and proxy servers), `workers = 0` so each is
a single process that stop()/kill() reach at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import boto3
from botocore.config import Config

from .procs import Proc, ProcError, free_port, tail

__all__ = ["SWIFT_VENV", "Swift"]

ROOT = Path(__file__).resolve().parents[2]
SWIFT_VENV = Path(os.environ.get("HUBCACHE_SWIFT_VENV", ROOT / ".venv-swift"))

_PROXY_PIPELINE = (
    "catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk tempurl s3api"
    " tempauth copy slo dlo versioned_writes symlink proxy-logging proxy-server"
)
_SERVERS = ("account", "container", "object")
# s3api refuses more parts than this, and SLO must accept as many segments.
_MAX_PARTS = 10000


class Swift:
    """Swift + s3api serving http://127.0.0.1:<port>, tempauth user test:tester / testing.

    The ports, rings and data in `workdir` are kept across stop()/start() and kill()/start(),
    so objects written before the store went down are there again after it comes back.
    """

    access_key = "test:tester"
    secret_key = "testing"
    region = "us-east-1"

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.etc = self.workdir / "etc"
        self.devices = self.workdir / "node"
        self.port = free_port()
        self.server_ports = {name: free_port() for name in _SERVERS}
        self.procs: dict[str, Proc] = {}
        self.start_seconds: float | None = None  # how long the last start() took
        self._configured = False

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **config: object):
        """A boto3 S3 client for this store (path-style, no extra checksums)."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"total_max_attempts": 1},
                **config,
            ),
        )

    def make_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    # --- lifecycle -----------------------------------------------------------

    def start(self, timeout: float = 60.0) -> Swift:
        """Start whatever is not running and wait until an S3 request succeeds."""
        began = time.monotonic()
        if not self._configured:
            self._configure()
        for name in (*_SERVERS, "proxy"):
            proc = self.procs.get(name)
            if proc is None or not proc.alive():
                self.procs[name] = Proc(
                    [SWIFT_VENV / "bin" / f"swift-{name}-server", self.etc / f"{name}-server.conf", "--verbose"],
                    log=self.workdir / f"{name}-server.log",
                    env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.workdir)},
                    name=f"swift-{name}-server",
                )
        self._wait_ready(timeout)
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop()

    def kill(self) -> None:
        """SIGKILL every Swift process: the store vanishes mid-request."""
        for proc in self.procs.values():
            proc.kill()

    def pause(self) -> None:
        """Freeze the proxy (SIGSTOP): connections are accepted but nothing answers."""
        os.kill(self.procs["proxy"].pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.procs["proxy"].pid, signal.SIGCONT)

    def __enter__(self) -> Swift:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(connect_timeout=1, read_timeout=5)
        while True:
            try:
                client.list_buckets()
                return
            except Exception as e:  # any failure means "not yet"; the last one is reported
                last = e
            for name, proc in self.procs.items():
                if not proc.alive():
                    raise ProcError(
                        f"swift-{name}-server exited with code {proc.returncode()}\n"
                        f"--- log tail ---\n{tail(proc.log_path)}"
                    )
            if time.monotonic() >= deadline:
                raise ProcError(
                    f"Swift at {self.endpoint} answered no S3 request within {timeout}s ({last})\n"
                    f"--- proxy log tail ---\n{tail(self.workdir / 'proxy-server.log')}"
                )
            time.sleep(0.1)

    # --- configuration ------------------------------------------------------

    def _configure(self) -> None:
        if not (SWIFT_VENV / "bin" / "swift-proxy-server").exists():
            raise ProcError(f"Swift is not installed in {SWIFT_VENV}: run scripts/test (it installs it there)")
        self.etc.mkdir(parents=True, exist_ok=True)
        (self.devices / "d1").mkdir(parents=True, exist_ok=True)
        (self.etc / "swift.conf").write_text(
            "[swift-hash]\n"
            "swift_hash_path_prefix = hubcache\n"
            "swift_hash_path_suffix = tests\n"
            "\n[storage-policy:0]\nname = gold\ndefault = yes\n"
        )
        common = (
            "[DEFAULT]\n"
            f"devices = {self.devices}\n"
            "mount_check = false\n"
            "bind_ip = 127.0.0.1\n"
            "workers = 0\n"
            f"swift_dir = {self.etc}\n"
            "log_level = INFO\n"
            # No syslog here: logs go to the console (--verbose), which Proc writes to a file.
            "log_address = /nonexistent\n"
        )
        for name, port in self.server_ports.items():
            (self.etc / f"{name}-server.conf").write_text(
                common + f"bind_port = {port}\n"
                f"\n[pipeline:main]\npipeline = {name}-server\n"
                f"\n[app:{name}-server]\nuse = egg:swift#{name}\n"
            )
            self._ring(name, port)
        (self.etc / "proxy-server.conf").write_text(
            common + f"bind_port = {self.port}\n"
            f"\n[pipeline:main]\npipeline = {_PROXY_PIPELINE}\n"
            "\n[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n"
            "\n[filter:tempauth]\nuse = egg:swift#tempauth\nuser_test_tester = testing .admin\n"
            f"\n[filter:s3api]\nuse = egg:swift#s3api\nlocation = {self.region}\n"
            f"max_upload_part_num = {_MAX_PARTS}\n"
            # memcached is optional: without a server the middleware only caches nothing.
            "\n[filter:cache]\nuse = egg:swift#memcache\n"
            "\n[filter:slo]\nuse = egg:swift#slo\n"
            f"max_manifest_segments = {_MAX_PARTS}\n"
            + "".join(
                f"\n[filter:{f}]\nuse = egg:swift#{f}\n"
                for f in ("catch_errors", "gatekeeper", "healthcheck", "proxy_logging", "listing_formats",
                          "bulk", "tempurl", "copy", "dlo", "versioned_writes", "symlink")
            ).replace("[filter:proxy_logging]", "[filter:proxy-logging]")
        )
        self._configured = True

    def _ring(self, name: str, port: int) -> None:
        builder = self.etc / f"{name}.builder"
        if builder.exists():
            return
        tool = SWIFT_VENV / "bin" / "swift-ring-builder"
        for args in (["create", "6", "1", "1"], ["add", f"r1z1-127.0.0.1:{port}/d1", "1"], ["rebalance"]):
            done = subprocess.run([tool, builder, *args], capture_output=True, text=True, timeout=60)
            # rebalance exits 1 for warnings (e.g. a single device), 2 for errors.
            if done.returncode not in (0, 1):
                raise ProcError(f"swift-ring-builder {name} {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
