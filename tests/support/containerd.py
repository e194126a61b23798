"""A private containerd (Debian's containerd 1.6) on its own socket, root and state folders, and
its `ctr` client."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from .clients import CLEAN_PATH, _unmount_under
from .procs import Proc, ProcError, tail

CONTAINERD_BIN = "/usr/bin/containerd"
CTR_BIN = "/usr/bin/ctr"


class Containerd:
    """containerd with every path under `workdir` (the sockets under a short /tmp folder: unix
    socket paths must stay below 108 bytes) and no CRI plugin. Stopped by stop(); wipe() also
    forgets every image and blob."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.root = self.workdir / "root"
        self.run_dir = Path(tempfile.mkdtemp(prefix="hcc-", dir="/tmp"))
        self.socket = self.run_dir / "containerd.sock"
        self.log = self.workdir / "containerd.log"
        self.proc: Proc | None = None

    def start(self, timeout: float = 30.0) -> Containerd:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.toml"
        config.write_text(
            f"""\
version = 2
root = "{self.root}"
state = "{self.run_dir / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.run_dir / 'ttrpc.sock'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.workdir / 'opt'}"
"""
        )
        # A clean environment: the daemon must not be the one using a proxy (ctr pulls itself).
        self.proc = Proc([CONTAINERD_BIN, "--config", config], log=self.log, env={"PATH": CLEAN_PATH}, name="containerd")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.alive():
            if self.socket.exists() and self.ctr("version", timeout=10).returncode == 0:
                return self
            time.sleep(0.2)
        self.stop()
        raise ProcError(f"containerd did not start within {timeout}s:\n{tail(self.log)}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def ctr(self, *args: str, env: Mapping[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `ctr --address SOCK ARGS` with only PATH (plus `env`) in its environment; never raises."""
        argv = [CTR_BIN, "--address", str(self.socket), *args]
        try:
            return subprocess.run(
                argv, env={"PATH": CLEAN_PATH, **(env or {})}, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(argv, 124, str(e.stdout or ""), f"timed out after {timeout}s")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        _unmount_under(self.run_dir, self.workdir)

    def wipe(self) -> None:
        """Stop, and forget every image, blob and snapshot."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)
