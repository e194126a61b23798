"""A real corporate HTTP proxy on loopback: Debian's tinyproxy, CONNECT allowed to chosen ports only."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from .procs import Proc, free_port, wait_for_port

TINYPROXY_BIN = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"

# tinyproxy logs every request line (and at LogLevel Info, every refusal), e.g.
#   CONNECT   Nov 28 03:02:56.399 [26868]: Request (file descriptor 5): CONNECT 127.0.0.1:18443 HTTP/1.1
_REQUEST_RE = re.compile(r"\]: Request \(file descriptor \d+\): (?P<method>[A-Z]+) (?P<target>\S+) ")
_REFUSED_RE = re.compile(r"\]: Refused CONNECT method on port (?P<port>\d+)")


class CorporateProxy:
    """tinyproxy listening on 127.0.0.1 only, accepting clients from 127.0.0.1 only, and allowing
    CONNECT to `connect_ports` only (anything else is refused with 403 and logged), so a CONNECT
    to a name that was meant to be mapped elsewhere shows up as a refusal, never as a detour."""

    def __init__(self, workdir: Path, connect_ports: list[int]):
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "tinyproxy.log"
        self.config_path = workdir / "tinyproxy.conf"
        self.connect_ports = list(connect_ports)
        self.proc: Proc | None = None
        self._mark = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CorporateProxy:
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Allow 127.0.0.1",
            "Timeout 120",
            "MaxClients 200",
            f'LogFile "{self.log_path}"',
            "LogLevel Info",
            "DisableViaHeader Yes",
            *(f"ConnectPort {p}" for p in self.connect_ports),
        ]
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc = Proc([TINYPROXY_BIN, "-d", "-c", self.config_path], log=self.workdir / "stdout.log")
        wait_for_port("127.0.0.1", self.port, timeout=10, log=self.workdir / "stdout.log")
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def _log(self) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(self._mark)
            return f.read().decode("utf-8", "replace")

    def reset(self) -> None:
        """Forget requests so far: the methods below report only later ones."""
        self._mark = self.log_path.stat().st_size if self.log_path.exists() else 0

    def requests(self) -> list[tuple[str, str]]:
        """(method, target) of every request the proxy received, oldest first."""
        return [(m["method"], m["target"]) for m in _REQUEST_RE.finditer(self._log())]

    def connects(self) -> list[str]:
        """The host:port of every CONNECT received (refused ones included)."""
        return [target for method, target in self.requests() if method == "CONNECT"]

    def refused_ports(self) -> list[int]:
        return [int(m["port"]) for m in _REFUSED_RE.finditer(self._log())]
