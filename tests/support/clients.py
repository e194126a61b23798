"""Real registry clients for tests: skopeo and a private dockerd.

Clients get an environment built from scratch so that proxy or TLS
variables of the test runner never leak in.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from .procs import Proc, ProcError, ProcId, children_of, kill_if_same, tail

if TYPE_CHECKING:
    from .hubcache import Hubcache

__all__ = ["DOCKERD_BIN", "DOCKER_CLI", "SKOPEO_BIN", "Dockerd", "pull", "pulled_blobs", "skopeo_copy"]

SKOPEO_BIN = "/usr/bin/skopeo"
DOCKERD_BIN = "/usr/sbin/dockerd"
# /usr/local/bin/docker may be a newer CLI; Debian's matches the 20.10 daemon.
DOCKER_CLI = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_scratch: Path | None = None
_scratch_lock = threading.Lock()


def _scratch_dir() -> Path:
    """A per-process directory for HOME, empty SSL_CERT_DIR, policy files."""
    global _scratch
    with _scratch_lock:  # clients may start from many threads at once
        if _scratch is None:
            scratch = Path(tempfile.mkdtemp(prefix="hubcache-clients-"))
            atexit.register(shutil.rmtree, scratch, True)
            (scratch / "home").mkdir()
            (scratch / "empty-certs").mkdir()
            (scratch / "empty-registries.d").mkdir()
            (scratch / "policy.json").write_text(
                json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
            )
            # Replaces the system registries.conf so no mirrors or aliases apply.
            (scratch / "registries.conf").write_text('unqualified-search-registries = []\n')
            _scratch = scratch
    return _scratch


def _timeout_result(argv: list[str], e: subprocess.TimeoutExpired) -> subprocess.CompletedProcess[str]:
    def s(x: object) -> str:
        if isinstance(x, bytes):
            return x.decode("utf-8", "replace")
        return x if isinstance(x, str) else ""

    return subprocess.CompletedProcess(
        argv, 124, s(e.stdout), s(e.stderr) + f"\n[harness] timed out after {e.timeout}s"
    )


def skopeo_copy(
    src: str,
    dest_dir: Path,
    *,
    proxy: str | None,
    ca_bundle: Path | None,
    cert_dir: Path | None = None,
    all_platforms: bool = False,
    os: str = "linux",
    arch: str = "amd64",
    timeout: float = 300,
    extra_env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `skopeo copy SRC dir:DEST_DIR` and return the finished process.

    Never raises for a failed copy or a timeout (returncode 124): tests
    assert on returncode/stdout/stderr. `src` is a full transport reference
    such as "docker://registry-1.docker.io/library/alpine:3.19".

    The environment holds only PATH, HOME (a scratch dir), SSL_CERT_DIR (an
    empty dir), CONTAINERS_REGISTRIES_CONF (an empty config), SSL_CERT_FILE
    when `ca_bundle` is given, HTTPS_PROXY/https_proxy when `proxy` is given,
    and `extra_env`. Without all_platforms, the os/arch instance is copied.
    `cert_dir` (a dir with ca.crt) is passed as --src-cert-dir.
    """
    scratch = _scratch_dir()
    env = {
        "PATH": CLEAN_PATH,
        "HOME": str(scratch / "home"),
        "SSL_CERT_DIR": str(scratch / "empty-certs"),
        "CONTAINERS_REGISTRIES_CONF": str(scratch / "registries.conf"),
    }
    if ca_bundle is not None:
        env["SSL_CERT_FILE"] = str(ca_bundle)
    if proxy is not None:
        env["HTTPS_PROXY"] = env["https_proxy"] = proxy
    env.update(extra_env or {})
    argv = [
        SKOPEO_BIN,
        "--registries.d", str(scratch / "empty-registries.d"),
        "--policy", str(scratch / "policy.json"),
        "--override-os", os,
        "--override-arch", arch,
        "copy",
    ]
    if all_platforms:
        argv.append("--all")
    if cert_dir is not None:
        argv += ["--src-cert-dir", str(cert_dir)]
    Path(dest_dir).mkdir(parents=True, exist_ok=True)
    argv += [src, f"dir:{dest_dir}"]
    try:
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as e:
        return _timeout_result(argv, e)


def pull(proxy: Hubcache, ref: str, dest: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    """skopeo copies `ref` through a started hubcache into dir:`dest`, trusting the proxy's CA;
    a failed copy fails the test with the proxy's log."""
    result = skopeo_copy(f"docker://{ref}", dest, proxy=proxy.url, ca_bundle=proxy.client_bundle, **kwargs)
    assert result.returncode == 0, result.stderr + proxy.log_text()[-3000:]
    return result


def pulled_blobs(dest: Path) -> set[str]:
    """Digests of the blobs skopeo wrote into a dir: layout, each checked against its bytes."""
    digests = set()
    for path in dest.iterdir():
        if len(path.name) == 64:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
            assert actual == path.name, f"{path.name} holds bytes hashing to {actual}"
            digests.add(f"sha256:{path.name}")
    return digests


# --- dockerd -------------------------------------------------------------

_live_daemons: weakref.WeakSet[Dockerd] = weakref.WeakSet()


@atexit.register
def _stop_all_daemons() -> None:
    for d in list(_live_daemons):
        try:
            d.stop()
        except Exception:  # best effort at interpreter exit
            pass


def _mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below any of `roots`, deepest first."""
    prefixes = [str(r.resolve()) for r in roots]
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            # Field 5 is the mount point, with spaces etc. octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if any(point == p or point.startswith(p + "/") for p in prefixes):
                found.append(point)
    return sorted(set(found), key=lambda p: p.count("/"), reverse=True)


def _unmount_under(*roots: Path) -> list[str]:
    """Lazily unmount everything below `roots`; return what was unmounted."""
    points = _mounts_under(*roots)
    for p in points:
        subprocess.run(["umount", "-l", p], capture_output=True, check=False)
    return points


def _stop_processes(ids: list[ProcId], timeout: float = 10.0) -> None:
    """SIGTERM each still-running process in `ids`, SIGKILL any left after `timeout`."""
    alive = [i for i in ids if kill_if_same(i, signal.SIGTERM)]
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [i for i in alive if kill_if_same(i, 0)]
    for i in alive:
        kill_if_same(i, signal.SIGKILL)


class Dockerd:
    """A private dockerd (Engine 20.10, vfs storage, no networking).

    Layout: data root `workdir/data-root` (kept across stop()/start(), removed
    by wipe()); config file, HOME and log under `workdir`; the socket, exec
    root and pid file in a short directory under /tmp because unix socket
    paths must stay below 108 bytes. Uses its own daemon.json ("{}"), so
    /etc/docker/daemon.json never applies.

    A daemon is never left running: stop() kills the whole process group
    (dockerd and its containerd), and an atexit hook stops live daemons.
    """

    def __init__(self, workdir: Path | str) -> None:
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_root = self.workdir / "data-root"
        self.home = self.workdir / "home"
        self.empty_cert_dir = self.workdir / "empty-certs"
        self.log_path = self.workdir / "dockerd.log"
        self.config_file = self.workdir / "daemon.json"
        self.run_dir = Path(tempfile.mkdtemp(prefix="hcd-", dir="/tmp"))
        self.exec_root = self.run_dir / "exec"
        self.socket_path = self.run_dir / "docker.sock"
        self.pid_file = self.run_dir / "docker.pid"
        self.proc: Proc | None = None
        self._children: list[ProcId] = []  # dockerd's managed containerd, once ready
        self.proxy_url: str | None = None
        self.ca_bundle: Path | None = None
        # Weak, so a forgotten instance can still be collected; atexit covers live ones.
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.run_dir, True)
        _live_daemons.add(self)

    @property
    def host(self) -> str:
        """DOCKER_HOST value for the CLI."""
        return f"unix://{self.socket_path}"

    def _argv(self) -> list[str]:
        return [
            DOCKERD_BIN,
            "--config-file", str(self.config_file),
            "--storage-driver=vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--data-root", str(self.data_root),
            "--exec-root", str(self.exec_root),
            "--pidfile", str(self.pid_file),
            "-H", self.host,
        ]

    def _env(self) -> dict[str, str]:
        env = {
            "PATH": CLEAN_PATH,
            "HOME": str(self.home),
            "NO_PROXY": "",
            "SSL_CERT_DIR": str(self.empty_cert_dir),
        }
        if self.proxy_url is not None:
            env["HTTPS_PROXY"] = self.proxy_url
        if self.ca_bundle is not None:
            env["SSL_CERT_FILE"] = str(self.ca_bundle)
        return env

    def cli_env(self) -> dict[str, str]:
        """Environment for the docker CLI talking to this daemon."""
        return {
            "PATH": CLEAN_PATH,
            "HOME": str(self.home),
            "DOCKER_HOST": self.host,
            "DOCKER_CONFIG": str(self.home / ".docker"),
        }

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(
        self,
        proxy_url: str | None,
        ca_bundle: Path | None,
        timeout: float = 60.0,
    ) -> Dockerd:
        """Start dockerd with HTTPS_PROXY=proxy_url and SSL_CERT_FILE=ca_bundle.

        Returns once `docker version` answers. If a daemon is already running
        it is stopped first (dockerd reads proxy and CA only at start-up).
        Raises ProcError with the log tail if it exits or is not ready in time.
        """
        self.stop()
        self.proxy_url = proxy_url
        self.ca_bundle = Path(ca_bundle) if ca_bundle is not None else None
        for d in (self.data_root, self.home, self.empty_cert_dir, self.exec_root):
            d.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("{}\n")
        self.proc = Proc(
            self._argv(), log=self.log_path, env=self._env(), cwd=self.workdir, name="dockerd"
        )
        deadline = time.monotonic() + timeout
        last: subprocess.CompletedProcess[str] | None = None
        while time.monotonic() < deadline:
            if not self.proc.alive():
                break
            if self.socket_path.exists():
                last = self.docker("version", timeout=10)
                if last.returncode == 0:
                    self._children = children_of(self.proc.pid)
                    return self
            time.sleep(0.2)
        alive = self.proc.alive()
        self.stop()
        detail = f"{last.stdout}\n{last.stderr}" if last is not None else "(socket never appeared)"
        raise ProcError(
            f"dockerd {'not ready' if alive else 'exited'} within {timeout}s: {detail}\n"
            f"--- log tail ({self.log_path}) ---\n{tail(self.log_path)}"
        )

    def docker(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run the docker CLI against this daemon; never raises (timeout -> 124)."""
        argv = [DOCKER_CLI, *args]
        try:
            return subprocess.run(
                argv, env=self.cli_env(), capture_output=True, text=True,
                timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired as e:
            return _timeout_result(argv, e)

    def pull(self, ref: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """`docker pull REF`; returns the finished process (never raises)."""
        return self.docker("pull", ref, timeout=timeout)

    def image_diff_ids(self, ref: str) -> list[str]:
        """RootFS.Layers of a local image (its diff_ids, in order).

        Raises RuntimeError if the image is not present.
        """
        r = self.docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"docker image inspect {ref} failed: {r.stderr.strip()}")
        return list(json.loads(r.stdout))

    def stop(self, timeout: float = 20.0) -> None:
        """Stop dockerd and its containerd, then unmount anything they left.

        dockerd stops its managed containerd itself on SIGTERM; containerd
        runs in its own session, so if dockerd had to be killed, its
        surviving children are killed here by pid (checked by start time).
        Idempotent; the data root is kept.
        """
        if self.proc is not None:
            kids = set(self._children)
            if self.proc.alive():
                kids.update(children_of(self.proc.pid))
            self.proc.stop(timeout)
            _stop_processes(sorted(kids))
            self._children = []
        _unmount_under(self.run_dir, self.workdir)

    def wipe(self) -> None:
        """Stop, then delete the data root so the next start holds no images."""
        self.stop()
        left = _mounts_under(self.run_dir, self.workdir)
        if left:
            raise RuntimeError(f"refusing to delete {self.data_root}: still mounted: {left}")
        if self.data_root.exists():
            shutil.rmtree(self.data_root)
        shutil.rmtree(self.exec_root, ignore_errors=True)

    def close(self) -> None:
        """Stop and remove the short /tmp run directory (the workdir stays)."""
        self.stop()
        _live_daemons.discard(self)
        self._finalizer()

    def __enter__(self) -> Dockerd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
