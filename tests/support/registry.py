"""A real distribution registry (Debian's docker-registry 2.8) over TLS on loopback."""

from __future__ import annotations

import http.client
import json
import re
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .images import ImageInfo
from .pki import TestCA
from .procs import Proc, ProcError, free_port, tail

__all__ = ["REGISTRY_BIN", "REGISTRY_NAME", "SKOPEO_BIN", "Registry", "RegistryRequest", "push"]

# The name the tests give the registry; the hubcache fixture maps it to the registry's port.
REGISTRY_NAME = "registry.hubcache.test"

REGISTRY_BIN = "/usr/bin/docker-registry"
SKOPEO_BIN = "/usr/bin/skopeo"
_PROBE_AGENT = "hubcache-harness-probe"
_CLEAN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

# The registry wraps its handler in gorilla's CombinedLoggingHandler, which
# writes one Apache "combined" line per finished request to stdout, e.g.
#   127.0.0.1 - - [27/Nov/2026:23:40:55 +0000] "GET /v2/ HTTP/2.0" 200 2 "" "curl/7.88.1"
# The size is the number of body bytes the handler wrote (for HEAD that is the
# would-be body length, not what went on the wire).
# The paths the registry's router dispatches (distribution's registry/api/v2/routes.go). Its name
# separator `[-]*` may be empty, which only joins alphanumerics: `-+` matches the same names
# without the exponential backtracking.
_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_TAG = r"[\w][\w.-]{0,127}"
_ROUTED = re.compile(
    rf"/v2/(?:|_catalog|{_NAME}/(?:tags/list|manifests/(?:{_TAG}|{_DIGEST})|blobs/{_DIGEST}"
    r"|blobs/uploads/[a-zA-Z0-9-_.=]*))"
)

_ACCESS_RE = re.compile(
    r'^(?P<remote>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<uri>\S+) (?P<proto>[^"]+)" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"\s*$'
)


@dataclass(frozen=True)
class RegistryRequest:
    """One request as recorded by the registry's access log."""

    method: str
    path: str  # request URI as logged (path plus any query string)
    status: int
    bytes: int  # body bytes written by the registry (see note on HEAD above)
    user_agent: str = ""
    remote: str = ""

    @property
    def is_blob(self) -> bool:
        return "/blobs/sha256:" in self.path and "/blobs/uploads/" not in self.path

    @property
    def is_manifest(self) -> bool:
        return "/manifests/" in self.path

    @property
    def reference(self) -> str:
        """The tag or digest after /manifests/ or /blobs/ ("" otherwise)."""
        for marker in ("/manifests/", "/blobs/"):
            if marker in self.path:
                return self.path.split(marker, 1)[1].split("?", 1)[0]
        return ""


def parse_access_log(text: str) -> list[RegistryRequest]:
    """Parse the combined-format access lines in `text`, ignoring other lines."""
    out: list[RegistryRequest] = []
    for line in text.splitlines():
        m = _ACCESS_RE.match(line)
        if not m:
            continue
        b = m["bytes"]
        out.append(
            RegistryRequest(
                method=m["method"],
                path=m["uri"],
                status=int(m["status"]),
                bytes=0 if b == "-" else int(b),
                user_agent=m["agent"],
                remote=m["remote"],
            )
        )
    return out


class Registry:
    """docker-registry serving https://127.0.0.1:<port> with filesystem storage.

    Guarantees: binds 127.0.0.1 only; the port is chosen once and kept across
    stop()/start(), as is the data under `workdir/data`; the TLS certificate
    (issued by `ca`) covers `names`, localhost and 127.0.0.1; deletes are
    enabled; the log (access lines included) goes to `workdir/registry.log`.
    With `remote_url` it is a pull-through cache of that registry (proxy
    mode), trusting only `ca` for it.
    """

    def __init__(
        self,
        workdir: Path | str,
        ca: TestCA,
        names: tuple[str, ...] | list[str] = ("registry.hubcache.test",),
        *,
        port: int | None = None,
        remote_url: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ca = ca
        self.names = list(names)
        self.port = port or free_port()
        self.metrics_port = free_port()  # its debug listener (Prometheus metrics), for settle()
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "registry.log"
        self.config_path = self.workdir / "config.yml"
        self.cert_dir = ca.cert_dir(self.workdir / "certs.d")  # holds only ca.crt
        self.cert_path, self.key_path = ca.issue(
            f"registry-{self.port}", [*self.names, "localhost"], ["127.0.0.1"]
        )
        self.remote_url = remote_url
        self.proc: Proc | None = None
        self._mark = 0  # byte offset in the log; requests() reads from here
        self._marked = False

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """host:port as used in image references (127.0.0.1:PORT)."""
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        # JSON is valid YAML and needs no YAML library.
        config = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "text", "accesslog": {"disabled": False}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.data_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"127.0.0.1:{self.port}",
                # A fixed secret keeps upload state valid across restarts.
                "secret": "hubcache-test-secret",
                "tls": {"certificate": str(self.cert_path), "key": str(self.key_path)},
                "headers": {"X-Content-Type-Options": ["nosniff"]},
                "debug": {
                    "addr": f"127.0.0.1:{self.metrics_port}",
                    "prometheus": {"enabled": True, "path": "/metrics"},
                },
            },
        }
        if self.remote_url is not None:
            config["proxy"] = {"remoteurl": self.remote_url}
        self.config_path.write_text(json.dumps(config, indent=2))

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the test CA."""
        return ssl.create_default_context(cafile=str(self.ca.cert_path))

    def _ping(self) -> int | None:
        req = urllib.request.Request(f"{self.url}/v2/", headers={"User-Agent": _PROBE_AGENT})
        try:
            with urllib.request.urlopen(req, context=self.ssl_context(), timeout=2) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (OSError, ssl.SSLError):
            return None

    def running(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def start(self, timeout: float = 20.0) -> Registry:
        """Start the registry if it is not running; return once GET /v2/ is 200.

        Raises ProcError (with the log tail) if it exits or is not ready in time.
        """
        if self.running():
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        env = {"PATH": _CLEAN_PATH, "HOME": str(self.workdir)}
        if self.remote_url is not None:
            env["SSL_CERT_FILE"] = str(self.ca.cert_path)
        self.proc = Proc(
            [REGISTRY_BIN, "serve", str(self.config_path)],
            log=self.log_path,
            env=env,
            cwd=self.workdir,
            name="docker-registry",
        )
        deadline = time.monotonic() + timeout
        status: int | None = None
        while time.monotonic() < deadline:
            if not self.proc.alive():
                break
            status = self._ping()
            if status == 200:
                break
            time.sleep(0.05)
        if status != 200:
            self.proc.kill()
            raise ProcError(
                f"docker-registry on {self.url} not ready (last /v2/ status {status})\n"
                f"--- log tail ({self.log_path}) ---\n{tail(self.log_path)}"
            )
        if not self._marked:
            self._mark = self.proc._log_start
            self._marked = True
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the registry (SIGTERM, then SIGKILL). Data is kept. Idempotent."""
        if self.proc is not None:
            self.proc.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the registry (simulates an upstream dying). Data is kept."""
        if self.proc is not None:
            self.proc.kill()

    def restart(self) -> Registry:
        self.stop()
        return self.start()

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what did the registry serve? -------------------------------------

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def requests(self) -> list[RegistryRequest]:
        """Requests logged since the first start() or the last reset_requests().

        Readiness probes made by this class are left out. Restarts do not
        reset the list. A request appears once the registry has finished it,
        which may be just after its client had the answer: call settle() first.
        """
        with open(self.log_path, "rb") as f:
            f.seek(self._mark)
            data = f.read()
        # A line still being written has no newline yet; leave it for later.
        text = data[: data.rfind(b"\n") + 1].decode("utf-8", "replace")
        return [r for r in parse_access_log(text) if r.user_agent != _PROBE_AGENT]

    def reset_requests(self) -> None:
        """Forget requests so far: requests() reports only later ones."""
        self._mark = self._log_size()
        self._marked = True

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until every request the registry has begun is finished and in its access log.

        The registry counts each request its router dispatches: in flight
        (`registry_http_in_flight_requests`) until its handler has counted it
        finished (`registry_http_requests_total`); the access line is written
        after that. Settled: two scrapes in a row with nothing in flight and
        the same count finished, and the log of this run holding exactly that
        many dispatched requests. Raises AssertionError after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        previous: tuple[int, int] | None = None
        while True:
            counts = self._dispatched()
            logged = self._logged_dispatched()
            if counts == previous and counts[0] == 0 and logged == counts[1]:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"docker-registry did not settle within {timeout}s: {counts[0]} requests in flight, "
                    f"{counts[1]} finished, {logged} of them logged"
                )
            previous = counts
            time.sleep(0.05)

    def _dispatched(self) -> tuple[int, int]:
        """(requests in flight, requests finished) in this run, from the registry's metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        in_flight = finished = 0
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name.startswith("registry_http_in_flight_requests{"):
                in_flight += int(float(value))
            elif name.startswith("registry_http_requests_total{"):
                finished += int(float(value))
        return in_flight, finished

    def _logged_dispatched(self) -> int:
        """Access lines of this run for requests the router dispatched (a path no route matches
        is answered 404 without being counted in the metrics)."""
        assert self.proc is not None
        with open(self.log_path, "rb") as f:
            f.seek(self.proc._log_start)
            data = f.read()
        text = data[: data.rfind(b"\n") + 1].decode("utf-8", "replace")
        return sum(1 for r in parse_access_log(text) if _ROUTED.fullmatch(r.path.partition("?")[0]))

    def blob_gets(self) -> list[RegistryRequest]:
        """GET requests for blobs (not uploads), any status."""
        return [r for r in self.requests() if r.method == "GET" and r.is_blob]

    def manifest_gets(self) -> list[RegistryRequest]:
        """GET requests for manifests, by tag or digest, any status."""
        return [r for r in self.requests() if r.method == "GET" and r.is_manifest]

    def manifest_heads(self) -> list[RegistryRequest]:
        """HEAD requests for manifests, any status."""
        return [r for r in self.requests() if r.method == "HEAD" and r.is_manifest]

    # --- filling it -------------------------------------------------------

    def push(
        self,
        oci_layout_dir: Path | str,
        ref_in_layout: str,
        repo_tag: str,
        all_platforms: bool = True,
        timeout: float = 600,
    ) -> None:
        """Copy an image from an OCI layout into this registry.

        `repo_tag` is "repo/name:tag" (no host). Manifest bytes and digests
        are preserved. OCI images go through `skopeo copy oci:... docker://...`
        (trusting the CA via --dest-cert-dir); images whose top manifest has a
        docker schema2 media type (which skopeo's oci: transport refuses to
        read) are uploaded by a small HTTP client here (always all platforms).
        Raises RuntimeError on failure. Requests made by the push show up in
        requests(): call reset_requests() afterwards.
        """
        self.start()
        layout = Path(oci_layout_dir)
        top = _layout_descriptor(layout, ref_in_layout)
        if top["mediaType"].startswith("application/vnd.docker."):
            _http_push(self, layout, top, repo_tag, timeout)
            return
        argv = [
            SKOPEO_BIN,
            "--registries.d", str(_empty_dir(self.workdir / "empty-registries.d")),
            "--policy", str(_accept_anything_policy(self.workdir)),
            "copy",
            "--dest-cert-dir", str(self.cert_dir),
            "--preserve-digests",
        ]
        if all_platforms:
            argv.append("--all")
        argv += [f"oci:{layout}:{ref_in_layout}", f"docker://{self.host}/{repo_tag}"]
        env = {"PATH": _CLEAN_PATH, "HOME": str(self.workdir)}
        proc = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"skopeo push to {self.host}/{repo_tag} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )


def _layout_descriptor(layout: Path, ref: str) -> dict[str, Any]:
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref:
            return dict(m)
    raise RuntimeError(f"no image {ref!r} in OCI layout {layout}")


def _http_push(reg: Registry, layout: Path, top: dict[str, Any], repo_tag: str, timeout: float) -> None:
    """Upload blobs, then child manifests by digest, then the top by tag."""
    repo, tag = repo_tag.rsplit(":", 1)
    conn = http.client.HTTPSConnection("127.0.0.1", reg.port, context=reg.ssl_context(), timeout=timeout)

    def blob_path(digest: str) -> Path:
        return layout / "blobs" / "sha256" / digest.split(":", 1)[1]

    def request(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn.request(method, url, body=body, headers={"User-Agent": "hubcache-harness-push", **(headers or {})})
        resp = conn.getresponse()
        resp.read()
        return resp

    def put_blob(digest: str) -> None:
        if request("HEAD", f"/v2/{repo}/blobs/{digest}").status == 200:
            return
        r = request("POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        if r.status != 202:
            raise RuntimeError(f"upload start for {digest}: HTTP {r.status}")
        loc = urllib.parse.urlsplit(r.headers["Location"])
        sep = "&" if loc.query else ""
        url = f"{loc.path}?{loc.query}{sep}digest={digest}"
        path = blob_path(digest)
        with open(path, "rb") as f:
            r = request("PUT", url, body=f, headers={
                "Content-Type": "application/octet-stream",
                "Content-Length": str(path.stat().st_size),
            })
        if r.status != 201:
            raise RuntimeError(f"upload of {digest}: HTTP {r.status}")

    def put_manifest(desc: dict[str, Any], ref: str) -> None:
        data = blob_path(desc["digest"]).read_bytes()
        r = request("PUT", f"/v2/{repo}/manifests/{ref}", body=data,
                    headers={"Content-Type": desc["mediaType"]})
        if r.status != 201:
            raise RuntimeError(f"manifest PUT {repo}:{ref}: HTTP {r.status}")

    def push_manifest(desc: dict[str, Any], ref: str) -> None:
        doc = json.loads(blob_path(desc["digest"]).read_bytes())
        if "manifests" in doc:
            for child in doc["manifests"]:
                push_manifest(child, child["digest"])
        else:
            for b in [doc["config"], *doc["layers"]]:
                put_blob(b["digest"])
        put_manifest(desc, ref)

    try:
        push_manifest(top, tag)
    finally:
        conn.close()


def push(registry: Registry, repo_tag: str, image: ImageInfo) -> ImageInfo:
    """Push a test image as REPO:TAG; the registry then reports only the requests that follow."""
    registry.push(image.layout_dir, image.ref, repo_tag)
    registry.reset_requests()
    return image


ALICE = ("alice", "s3cret")  # the owner of the private repositories the tests make


@contextmanager
def private_repository(registry: Registry, dockerhub: Any, repository: str, image: ImageInfo) -> Iterator[ImageInfo]:
    """`image` pushed as REPOSITORY:1 and private to ALICE on the Docker Hub double, until the end."""
    push(registry, f"{repository}:1", image)
    dockerhub.private_repos[repository] = ALICE
    try:
        yield image
    finally:
        del dockerhub.private_repos[repository]


def _empty_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _accept_anything_policy(directory: Path) -> Path:
    """A containers-policy.json accepting any image (we never sign test images)."""
    path = directory / "policy.json"
    if not path.exists():
        path.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return path
