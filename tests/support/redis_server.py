"""A real Redis (Debian's redis-server) on loopback, on its own port, with no persistence."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import redis

from .procs import Proc, ProcError, free_port, tail

__all__ = ["REDIS_BIN", "Redis"]

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


class Redis:
    """redis-server on 127.0.0.1:<port>. The port is kept across stop()/start(); the data is not
    (nothing is saved), as after a real crash of a cache-only Redis."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.port = free_port()
        self.proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self, timeout: float = 20.0) -> Redis:
        if self.proc is not None and self.proc.alive():
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = Proc(
            [REDIS_BIN, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", self.workdir, "--daemonize", "no"],
            log=self.workdir / "redis.log",
            name="redis-server",
        )
        deadline = time.monotonic() + timeout
        probe = self.client()
        while True:
            try:
                probe.ping()
                return self
            except redis.RedisError as e:
                last = e
            if not self.proc.alive() or time.monotonic() >= deadline:
                raise ProcError(f"redis-server on {self.url} did not answer ({last})\n{tail(self.proc.log_path)}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()

    def __enter__(self) -> Redis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
