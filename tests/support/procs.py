"""Start and stop real processes for tests, and measure them.

Everything here is stdlib-only and Linux-specific (it reads /proc).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["Proc", "ProcError", "ProcId", "children_of", "free_port", "kill_if_same", "process_tree", "tail", "wait_for_port"]


class ProcError(RuntimeError):
    """A process did not start, or did not become ready in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    The port is released before returning, so another process could take it
    first; for tests on one machine that race is rare enough.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path | str | None, lines: int = 40) -> str:
    """Return the last `lines` lines of a text file ("" if it is missing or None)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 20.0,
    *,
    log: Path | str | None = None,
    proc: Proc | None = None,
) -> None:
    """Block until a TCP connect to host:port succeeds.

    Raises ProcError after `timeout` seconds, or as soon as `proc` (if given)
    has exited; the message includes the tail of `log` (or of proc's log).
    """
    if log is None and proc is not None:
        log = proc.log_path
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as e:
            last_error = e
        if proc is not None and not proc.alive():
            raise ProcError(
                f"{proc.name} exited with code {proc.returncode()} before "
                f"{host}:{port} accepted connections\n--- log tail ---\n{tail(log)}"
            )
        if time.monotonic() >= deadline:
            raise ProcError(
                f"{host}:{port} did not accept connections within {timeout}s "
                f"({last_error})\n--- log tail ({log}) ---\n{tail(log)}"
            )
        time.sleep(0.05)


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # comm may contain spaces or parentheses; it ends at the last ")".
    return stat[stat.rindex(")") + 2 :].split()


ProcId = tuple[int, int]  # (pid, start time in clock ticks): unique even if a pid is reused


def children_of(pid: int) -> list[ProcId]:
    """Direct children of `pid`, as (pid, start time) pairs."""
    out: list[ProcId] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(int(entry))
        except (OSError, ValueError):
            continue
        if int(fields[1]) == pid:
            out.append((int(entry), int(fields[19])))
    return out


def process_tree(pid: int) -> dict[ProcId, list[str]]:
    """`pid` and its live descendants, each with its /proc stat fields (field 3 onwards)."""
    table: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                table[int(entry)] = _stat_fields(int(entry))
            except (OSError, ValueError):
                continue  # exited while we looked
    members = [pid] if pid in table else []
    for member in members:  # grows as children are found: a breadth-first walk
        members += [p for p, fields in table.items() if int(fields[1]) == member]
    return {(p, int(table[p][19])): table[p] for p in members}


def kill_if_same(proc_id: ProcId, sig: int) -> bool:
    """Send `sig` to proc_id's pid only if it is still that same process."""
    pid, start = proc_id
    try:
        if int(_stat_fields(pid)[19]) != start:
            return False
        os.kill(pid, sig)
        return True
    except (OSError, ValueError, IndexError):
        return False


_live: weakref.WeakSet[Proc] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # Safety net: a test that forgot stop() must not leave servers running.
    for p in list(_live):
        try:
            p.stop(5)
        except Exception:
            pass


class Proc:
    """One subprocess whose stdout and stderr go to a log file.

    The process starts in its own session (process group), so stop()/kill()
    also reach children that stay in that group. Use as a context manager to
    guarantee it is stopped; processes still running at interpreter exit are
    stopped by an atexit hook. The log file is appended to, so restarts keep
    earlier output.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log: Path | str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        name: str | None = None,
    ) -> None:
        """Start `argv` now; stdout and stderr are appended to the file `log`.

        `env` None inherits the caller's environment. Raises ProcError if the
        program cannot be executed.
        """
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = Path(log)
        self.name = name or Path(self.argv[0]).name
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            try:
                self._popen = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=True,
                )
            except OSError as e:
                raise ProcError(f"cannot start {self.argv!r}: {e}") from e
        _live.add(self)
        # Peak values are remembered because /proc/<pid> vanishes once reaped.
        self._last_hwm_kb = 0
        self._last_cpu = 0.0

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def popen(self) -> subprocess.Popen[bytes]:
        return self._popen

    def returncode(self) -> int | None:
        """The exit code if the process has exited, else None (does not block).

        Reaps the process if it has exited (group members left behind are
        then no longer signalled by stop()).
        """
        return self._popen.poll()

    def alive(self) -> bool:
        """True while the main process runs (not yet exited)."""
        return not self._wait_unreaped(0)

    def _signal_group(self, sig: int) -> None:
        if self._popen.returncode is not None:
            return  # reaped: the pid may belong to someone else now
        try:
            os.killpg(self._popen.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _wait_unreaped(self, timeout: float) -> bool:
        """Wait until the leader exits, without reaping it. True if it exited.

        While the leader is an unreaped zombie its pid (and so its process
        group id) cannot be reused, so a later killpg hits only our processes.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._popen.returncode is not None:
                return True
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def _finish(self) -> None:
        """Kill leftovers in the group while the leader is still a zombie, then reap."""
        if self._popen.returncode is None:
            self._signal_group(signal.SIGKILL)
        self._popen.wait(10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, wait up to `timeout`, then SIGKILL it.

        Idempotent. Any process left in the group (children that outlived the
        leader) is SIGKILLed too. Returns the exit code of the leader.
        """
        if self._popen.returncode is None:
            self._sample()
            self._signal_group(signal.SIGTERM)
            if not self._wait_unreaped(timeout):
                self._signal_group(signal.SIGKILL)
                self._wait_unreaped(10)
            self._finish()
        return self._popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the process group immediately and reap it. Idempotent."""
        if self._popen.returncode is None:
            self._sample()
            self._signal_group(signal.SIGKILL)
            self._wait_unreaped(10)
            self._finish()
        return self._popen.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit; raises subprocess.TimeoutExpired."""
        return self._popen.wait(timeout)

    def _sample(self) -> None:
        try:
            self.peak_rss_mb()
            self.cpu_seconds()
        except ProcessLookupError:
            pass

    def peak_rss_mb(self) -> float:
        """Peak resident set size (VmHWM) in MiB of the main process only.

        After the process has exited this returns the last value seen by a
        previous call (or by stop()/kill(), which sample it first).
        """
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self._last_hwm_kb = max(self._last_hwm_kb, int(line.split()[1]))
                        break
        except (FileNotFoundError, ProcessLookupError):
            pass
        return self._last_hwm_kb / 1024.0

    def cpu_seconds(self) -> float:
        """User + system CPU seconds of the main process (utime + stime).

        Same after-exit rule as peak_rss_mb(). Reaped children's time is not
        included.
        """
        try:
            fields = _stat_fields(self.pid)
            ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
            self._last_cpu = ticks / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        return self._last_cpu

    def log_text(self, since_start: bool = False) -> str:
        """The log file's text; with since_start, only what this run wrote."""
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_start)
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} rc={self._popen.returncode}>"
