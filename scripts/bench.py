"""Pull benchmark: the same images pulled by skopeo and dockerd over eight paths, side by side.

Paths: straight from the upstream registry (`direct`); through plain mitmdump that only streams
and routes (`mitmdump`: the floor of any mitmproxy addon); through hubcache, cold and warm, as a
proxy and as a registry mirror (`hubcache-mirror`, which clients reach directly); and
through the distribution registry's own pull-through cache (`registry-proxy`, the seed system),
cold and warm. Everything runs on loopback under a temporary folder and is stopped at the end.

Clients on other machines are served as hubcache serves them, on an address of this machine
other than 127.0.0.1 (no other is available here): HTTPS blob URLs on it that clients reach
directly (`hubcache-https`, `blob_listen`), the same URLs relayed through the proxy
(`hubcache-relay`, what a client without NO_PROXY gets), and a mirror listening on it
(`hubcache-mirror-net`).

Every pull gets a freshly started proxy process (a warm one finds the cache its cold run left),
so the proxy's peak memory and CPU time belong to that pull alone. Ratios are taken pull by pull
within one repetition, then the median of them is reported.

Through each cold cache, and each warm one, it also times many skopeo clients pulling one image
at once (the warm ways alternated `--runs` times, each with its clients' own CPU: on one machine
they share the cores with the proxy, so a CPU second the proxy spends is one the clients lack),
and the time to first byte of one cold blob (the big image's layer, fetched by curl) for the first
client and for a second one that joins the fill once the first has bytes.

In a virtual machine whose hypervisor takes back the memory the guest frees (free page
reporting), a page the guest allocates again must first be backed by the host: whichever pull
happens to grow into such memory pays for it, in the client's file writes. `--hold-memory` (root)
holds the reporting off for the run and touches the free memory once first, so every path
allocates from memory that is backed already.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import mitmproxy.version
import rich.box
import rich.console
import rich.table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.clients import CLEAN_PATH, DOCKERD_BIN, Dockerd, skopeo_copy  # noqa: E402
from support.hubcache import MITMDUMP, Hubcache  # noqa: E402
from support.images import Blob, ImageInfo, build_image  # noqa: E402
from support.pki import TestCA, ca_bundle  # noqa: E402
from support.procs import Proc, ProcError, free_port, process_tree, wait_for_port  # noqa: E402
from support.registry import REGISTRY_BIN, SKOPEO_BIN, Registry  # noqa: E402

REGISTRY_NAME = "registry.hubcache.test"  # the upstream's name behind the proxies, as in the tests
MB = 1_000_000
NETWORK_ADDRESS = "127.0.0.2"  # "another machine's view" of this one: an address other than the proxy's
MIRROR_NETWORK_ADDRESS = "127.0.0.3"
CLIENTS = ("skopeo", "docker")
RATIOS = (
    ("hubcache warm", "registry-proxy warm"),
    ("hubcache cold", "registry-proxy cold"),
    ("hubcache-mirror warm", "registry-proxy warm"),
    ("hubcache-https warm", "registry-proxy warm"),
    ("hubcache-relay warm", "registry-proxy warm"),
    ("hubcache-mirror-net warm", "registry-proxy warm"),
    ("hubcache-mirror cold", "registry-proxy cold"),
    ("hubcache cold", "mitmdump"),
    ("hubcache warm", "mitmdump"),
)

# Tables go to stdout, wide enough for them when it is a file or a pipe; progress goes to stderr.
console = rich.console.Console(width=None if sys.stdout.isatty() else 200)
progress = rich.console.Console(stderr=True)


class BenchError(Exception):
    """A measurement failed; the message is one line."""


# --- images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    name: str
    layer_sizes: tuple[int, ...]


FULL_IMAGES = (ImageSpec("layers", (30_000_000,) * 8), ImageSpec("big", (1 << 30,)))
SMALL_IMAGES = (ImageSpec("layers", (5_000_000,) * 6), ImageSpec("big", (100_000_000,)))


@dataclass(frozen=True)
class BenchImage:
    """An image in the upstream registry, as `bench/<name>:1`."""

    name: str
    info: ImageInfo

    @property
    def bytes(self) -> int:
        """What a client downloads: manifest, config and layers."""
        return self.info.total_bytes

    @property
    def label(self) -> str:
        return f"{self.name} {self.bytes / MB:.0f} MB"

    @property
    def shape(self) -> str:
        layers = self.info.platforms[0].layers
        return f"{self.name}: {len(layers)} x {layers[0].size / MB:.0f} MB"

    def ref(self, host: str) -> str:
        return f"{host}/bench/{self.name}:1"


def publish(upstream: Registry, spec: ImageSpec, layouts: Path) -> BenchImage:
    """Build the image (incompressible layers) and push it to the upstream."""
    info = build_image(layouts / spec.name, "1", list(spec.layer_sizes), seed=spec.name)
    upstream.push(info.layout_dir, info.ref, f"bench/{spec.name}:1")
    shutil.rmtree(info.layout_dir)  # the registry holds it now
    return BenchImage(spec.name, info)


# --- measuring ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """How a client reaches the images on one path."""

    host: str  # the registry in image references
    proxy: str | None  # HTTPS_PROXY
    ca_bundle: Path  # what the client trusts (SSL_CERT_FILE)


@dataclass(frozen=True)
class Sample:
    """One pull."""

    seconds: float
    rss_mb: float | None  # peak RSS of the proxy (None: no proxy)
    cpu_seconds: float | None  # CPU time of the proxy during the pull
    upstream_requests: int
    upstream_bytes: int  # body bytes of the GETs the upstream answered


class TreeMeter:
    """Peak memory and CPU time of a process and its descendants, read from /proc.

    CPU time is the growth between enter and exit of utime+stime+cutime+cstime summed over the
    live members, so a child that exited and was reaped still counts through its parent. Peak RSS
    is the sum of each member's own peak (VmHWM): exact for one process, an upper bound for
    several. Members are sampled every INTERVAL, so a child living less than that may be missed.
    """

    INTERVAL = 0.2

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu_seconds = 0.0
        self._peaks_kb: dict[tuple[int, int], int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tree meter", daemon=True)

    @property
    def peak_rss_mb(self) -> float:
        return sum(self._peaks_kb.values()) / 1024

    def __enter__(self) -> TreeMeter:
        self._cpu_start = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.cpu_seconds = self._sample() - self._cpu_start

    def _watch(self) -> None:
        while not self._done.wait(self.INTERVAL):
            self._sample()

    def _sample(self) -> float:
        """Record every member's peak RSS; return the members' CPU seconds so far."""
        ticks = 0
        for member, fields in process_tree(self.pid).items():
            ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
            self._peaks_kb[member] = max(self._peaks_kb.get(member, 0), _vm_hwm_kb(member[0]))
        return ticks / os.sysconf("SC_CLK_TCK")


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pull_timeout(nbytes: int) -> float:
    """Generous, so that only a hang reaches it: a minute, plus 5 MB/s."""
    return 60 + nbytes / (5 * MB)


def last_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[:limit]


def first_line(error: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:limit]


class SkopeoClient:
    """`skopeo copy docker://... dir:...`, into an emptied folder each time."""

    name = "skopeo"

    def __init__(self, workdir: Path) -> None:
        self.dest = workdir / "skopeo"
        self.route: Route | None = None

    def prepare(self, route: Route) -> None:
        shutil.rmtree(self.dest, ignore_errors=True)
        self.route = route

    def pull(self, ref: str, timeout: float) -> None:
        assert self.route is not None
        result = skopeo_copy(
            f"docker://{ref}", self.dest, proxy=self.route.proxy, ca_bundle=self.route.ca_bundle, timeout=timeout
        )
        if result.returncode != 0:
            raise BenchError(f"skopeo exited with {result.returncode}: {last_line(result.stderr)}")

    def close(self) -> None:
        shutil.rmtree(self.dest, ignore_errors=True)


class DockerClient:
    """`docker pull` on a private dockerd, wiped before each pull so it holds nothing."""

    name = "docker"

    def __init__(self, workdir: Path) -> None:
        self.daemon = Dockerd(workdir / "dockerd")

    def prepare(self, route: Route) -> None:
        self.daemon.wipe()
        self.daemon.start(route.proxy, route.ca_bundle)

    def pull(self, ref: str, timeout: float) -> None:
        result = self.daemon.pull(ref, timeout=timeout)
        if result.returncode != 0:
            raise BenchError(f"docker pull exited with {result.returncode}: {last_line(result.stderr + result.stdout)}")

    def close(self) -> None:
        try:
            self.daemon.wipe()
        finally:
            self.daemon.close()


Client = SkopeoClient | DockerClient


class Bench:
    """What every measurement shares: the work folder, the test CA, the upstream and its images."""

    def __init__(self, workdir: Path, specs: tuple[ImageSpec, ...], stack: ExitStack) -> None:
        self.workdir = workdir
        self.ca = TestCA(workdir / "ca")
        self.client_bundle = ca_bundle([self.ca.cert_path], workdir / "client-bundle.pem")
        self.upstream = Registry(workdir / "upstream", self.ca, names=(REGISTRY_NAME,))
        stack.callback(self.upstream.stop)
        self.upstream.start()
        self.images = [publish(self.upstream, spec, workdir / "layouts") for spec in specs]
        self._folders = 0

    def folder(self, name: str) -> Path:
        """A new, empty folder for one proxy's files."""
        self._folders += 1
        path = self.workdir / f"{name}-{self._folders}"
        path.mkdir()
        return path

    def served(self) -> tuple[int, int]:
        """Requests the upstream answered since reset_requests(), and the body bytes of its GETs."""
        requests = self.upstream.requests()
        return len(requests), sum(r.bytes for r in requests if r.method == "GET")


# --- the ways to the upstream ---------------------------------------------------------------


class Way:
    """One way from the clients to the upstream, measured as one path, or two for a cache (cold,
    then warm). Every pull gets a new proxy process, so its memory and CPU figures are its own;
    the warm one finds what the cold one stored."""

    paths: tuple[str, ...]
    proc: Proc | None = None

    def start(self) -> None:
        pass

    def route(self) -> Route:
        raise NotImplementedError

    def settle(self, image: BenchImage) -> None:
        """Wait for what the proxy still does after the client's last byte."""

    def stop(self) -> None:
        pass

    def close(self) -> None:
        """Stop, and delete what the proxy stored."""
        self.stop()


class Direct(Way):
    """The client straight to the upstream, trusting the test CA."""

    paths = ("direct",)

    def __init__(self, bench: Bench) -> None:
        self.bench = bench

    def route(self) -> Route:
        return Route(self.bench.upstream.host, None, self.bench.client_bundle)


class PlainMitmdump(Way):
    """mitmdump with only scripts/bench_route.py: streams every body, routes REGISTRY_NAME."""

    paths = ("mitmdump",)

    def __init__(self, bench: Bench) -> None:
        self.workdir = bench.folder("mitmdump")
        self.upstream = bench.upstream
        self.port = free_port()

    def start(self) -> None:
        argv = [
            MITMDUMP,
            "-s", ROOT / "scripts" / "bench_route.py",
            "--listen-host", "127.0.0.1",
            "--listen-port", str(self.port),
            "--set", f"confdir={self.workdir / 'conf'}",
            "--set", "stream_large_bodies=1",
            "--set", f"ssl_verify_upstream_trusted_ca={self.upstream.ca.cert_path}",
            "--set", f"route={REGISTRY_NAME}=127.0.0.1:{self.upstream.port}",
        ]
        self.proc = Proc(argv, log=self.workdir / "mitmdump.log", cwd=self.workdir)
        wait_for_port("127.0.0.1", self.port, timeout=30, proc=self.proc)

    def route(self) -> Route:
        bundle = ca_bundle([self.workdir / "conf" / "mitmproxy-ca-cert.pem"], self.workdir / "client-bundle.pem")
        return Route(REGISTRY_NAME, f"http://127.0.0.1:{self.port}", bundle)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


class ServerWay(Way):
    """A way through a server process of the test harness (`server` has start, stop and proc)."""

    server: Hubcache | Registry

    @property
    def proc(self) -> Proc | None:  # type: ignore[override]
        return self.server.proc

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


class HubcacheProxy(ServerWay):
    """hubcache caching REGISTRY_NAME, which it reaches at the upstream's address."""

    paths = ("hubcache cold", "hubcache warm")

    def __init__(self, bench: Bench) -> None:
        options = {"registries": [REGISTRY_NAME], "upstream_map": [f"{REGISTRY_NAME}=127.0.0.1:{bench.upstream.port}"]}
        self.server = Hubcache(bench.folder("hubcache"), bench.ca.cert_path, options)

    def route(self) -> Route:
        return Route(REGISTRY_NAME, self.server.url, self.server.client_bundle)

    def settle(self, image: BenchImage) -> None:
        self.server.journal()  # a fill is journalled as its clients get their last byte

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.server.cache_dir, ignore_errors=True)


class HubcacheMirror(HubcacheProxy):
    """hubcache's mirror endpoint, which clients reach directly as a registry: the first name of
    the repository path names the registry it caches (127.0.0.1:PORT/registry.hubcache.test/...)."""

    paths = ("hubcache-mirror cold", "hubcache-mirror warm")

    def __init__(self, bench: Bench) -> None:
        self.port = free_port()
        options = {
            "registries": [REGISTRY_NAME],
            "upstream_map": [f"{REGISTRY_NAME}=127.0.0.1:{bench.upstream.port}"],
            "mirror_listen": f"127.0.0.1:{self.port}",
        }
        self.server = Hubcache(bench.folder("hubcache-mirror"), bench.ca.cert_path, options)

    def start(self) -> None:
        self.server.start()
        wait_for_port("127.0.0.1", self.port)

    def route(self) -> Route:
        return Route(f"127.0.0.1:{self.port}/{REGISTRY_NAME}", None, self.server.client_bundle)


class HubcacheHttps(HubcacheProxy):
    """hubcache as a proxy for clients on other machines: blob URLs are HTTPS on an address of this
    machine (`blob_listen`), which Go clients reach directly (they never proxy a loopback address;
    a network address needs NO_PROXY)."""

    paths = ("hubcache-https cold", "hubcache-https warm")
    blob_listen = NETWORK_ADDRESS

    def __init__(self, bench: Bench) -> None:
        options = {
            "registries": [REGISTRY_NAME],
            "upstream_map": [f"{REGISTRY_NAME}=127.0.0.1:{bench.upstream.port}"],
            "blob_urls": "https",
            "blob_listen": self.blob_listen,
        }
        self.server = Hubcache(bench.folder(self.paths[0].split()[0]), bench.ca.cert_path, options)


class HubcacheRelay(HubcacheHttps):
    """The same, with blob URLs relayed through the proxy as raw TCP (`blobs.hubcache.invalid`)."""

    paths = ("hubcache-relay cold", "hubcache-relay warm")
    blob_listen = "relay"


class HubcacheMirrorNetwork(HubcacheMirror):
    """hubcache's mirror endpoint on an address of this machine other than 127.0.0.1: blobs come
    from the blob server's HTTPS listener on that address."""

    paths = ("hubcache-mirror-net cold", "hubcache-mirror-net warm")

    def __init__(self, bench: Bench) -> None:
        self.port = free_port()
        options = {
            "registries": [REGISTRY_NAME],
            "upstream_map": [f"{REGISTRY_NAME}=127.0.0.1:{bench.upstream.port}"],
            "mirror_listen": f"{MIRROR_NETWORK_ADDRESS}:{self.port}",
        }
        self.server = Hubcache(bench.folder("hubcache-mirror-net"), bench.ca.cert_path, options)

    def start(self) -> None:
        self.server.start()
        wait_for_port(MIRROR_NETWORK_ADDRESS, self.port)

    def route(self) -> Route:
        return Route(f"{MIRROR_NETWORK_ADDRESS}:{self.port}/{REGISTRY_NAME}", None, self.server.client_bundle)


class RegistryProxy(ServerWay):
    """The distribution registry in proxy mode, a registry of its own that clients reach directly."""

    paths = ("registry-proxy cold", "registry-proxy warm")

    def __init__(self, bench: Bench) -> None:
        self.server = Registry(
            bench.folder("registry-proxy"), bench.ca, names=("registry-proxy.hubcache.test",), remote_url=bench.upstream.url
        )
        self.client_bundle = bench.client_bundle

    def route(self) -> Route:
        return Route(self.server.host, None, self.client_bundle)

    def settle(self, image: BenchImage) -> None:
        """It stores each blob with a fetch of its own, which may end after the client's: wait for
        the files. One still missing at the timeout is fetched again by the warm pull, which the
        upstream columns then show."""
        blobs = [image.info.platforms[0].config, *image.info.platforms[0].layers]
        root = self.server.data_dir / "docker/registry/v2/blobs/sha256"
        files = [(root / b.digest[7:9] / b.digest[7:] / "data", b.size) for b in blobs]
        deadline = time.monotonic() + pull_timeout(image.bytes)
        while time.monotonic() < deadline:
            if all(path.exists() and path.stat().st_size == size for path, size in files):
                return
            time.sleep(0.1)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.server.data_dir, ignore_errors=True)


WAYS: dict[str, type[Way]] = {
    "direct": Direct,
    "mitmdump": PlainMitmdump,
    "hubcache": HubcacheProxy,
    "hubcache-mirror": HubcacheMirror,
    "hubcache-https": HubcacheHttps,
    "hubcache-relay": HubcacheRelay,
    "hubcache-mirror-net": HubcacheMirrorNetwork,
    "registry-proxy": RegistryProxy,
}


# --- pulls ----------------------------------------------------------------------------------


def measure(bench: Bench, way: Way, client: Client, image: BenchImage) -> Iterator[tuple[str, Sample]]:
    """One pull of `image` for each path of `way`."""
    try:
        for path in way.paths:
            way.start()
            sample = pull_once(bench, way, client, image)
            way.stop()
            yield path, sample
    finally:
        way.close()


def pull_once(bench: Bench, way: Way, client: Client, image: BenchImage) -> Sample:
    """Time one pull; then wait for the proxy and the upstream's log, and count what it served."""
    route = way.route()
    client.prepare(route)
    bench.upstream.reset_requests()
    os.sync()  # see `measure_at_once`
    meter = TreeMeter(way.proc.pid) if way.proc else None
    with meter or nullcontext():
        start = time.monotonic()
        try:
            client.pull(image.ref(route.host), pull_timeout(image.bytes))
        except BenchError as e:
            raise BenchError(f"{e}{proxy_state(way.proc)}") from None
        seconds = time.monotonic() - start
        way.settle(image)
        bench.upstream.settle()
    requests, nbytes = bench.served()
    return Sample(seconds, meter.peak_rss_mb if meter else None, meter.cpu_seconds if meter else None, requests, nbytes)


def proxy_state(proxy: Proc | None) -> str:
    if proxy is None or proxy.alive():
        return ""
    return f" ({proxy.name} exited with code {proxy.returncode()})"


# --- many clients at once -------------------------------------------------------------------


@dataclass(frozen=True)
class Concurrent:
    """N skopeo clients pulling the same image at once through a cold cache, or a warm one."""

    path: str
    run: int
    image: BenchImage
    clients: int
    succeeded: int
    seconds: float  # from the common start to the last client's end
    rss_mb: float
    cpu_seconds: float
    clients_cpu_seconds: float  # the skopeo processes': on one machine, they share its CPU with the proxy
    upstream_requests: int
    upstream_bytes: int

    @property
    def throughput(self) -> float:
        return self.clients * self.image.bytes / self.seconds


def measure_at_once(bench: Bench, way: Way, image: BenchImage, clients: int, run: int, warm: bool = False) -> tuple[Concurrent, list[str]]:
    """`clients` skopeo pulls at once through `way`, started now: through its cold cache, or
    (`warm`, after `fill_once`) through the cache one pull filled; the result and the errors."""
    way.start()
    try:
        assert way.proc is not None
        bench.upstream.reset_requests()
        # What earlier pulls wrote goes to disk first: else a pull pays for flushing it (the kernel
        # starts at its background threshold, 2 GiB here) whenever the pulls before it were quick.
        os.sync()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)  # the proxies are not reaped: skopeo's alone
        with TreeMeter(way.proc.pid) as meter:
            seconds, errors = pull_at_once(bench, way.route(), image, way.proc, clients)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            way.settle(image)
            bench.upstream.settle()
    finally:
        way.stop()
    clients_cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    requests, nbytes = bench.served()
    path = way.paths[-1 if warm else 0]
    succeeded = clients - len(errors)
    return Concurrent(path, run, image, clients, succeeded, seconds, meter.peak_rss_mb, meter.cpu_seconds, clients_cpu, requests, nbytes), errors


def fill_once(bench: Bench, way: Way, image: BenchImage) -> None:
    """One pull through `way`, to fill its cache for the warm pulls at once."""
    way.start()
    try:
        fill = SkopeoClient(bench.workdir / "fill")
        fill.prepare(way.route())
        fill.pull(image.ref(way.route().host), pull_timeout(image.bytes))
        fill.close()
        way.settle(image)
        bench.upstream.settle()
    finally:
        way.stop()


def pull_at_once(bench: Bench, route: Route, image: BenchImage, proxy: Proc, clients: int) -> tuple[float, list[str]]:
    """Start `clients` skopeo copies together; return the time until the last ended, and errors."""
    start_together = threading.Barrier(clients + 1, timeout=60)
    timeout = 60 + clients * image.bytes / (10 * MB)

    def pull(index: int) -> subprocess.CompletedProcess[str]:
        dest = bench.workdir / f"at-once-{index}"
        start_together.wait()
        try:
            return skopeo_copy(f"docker://{image.ref(route.host)}", dest, proxy=route.proxy, ca_bundle=route.ca_bundle, timeout=timeout)
        finally:
            shutil.rmtree(dest, ignore_errors=True)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(pull, i) for i in range(clients)]
        start_together.wait()
        start = time.monotonic()
        results = [f.result() for f in futures]
        seconds = time.monotonic() - start
    errors = [f"skopeo exited with {r.returncode}: {last_line(r.stderr)}{proxy_state(proxy)}" for r in results if r.returncode]
    return seconds, errors


# --- time to first byte ---------------------------------------------------------------------


CURL = "/usr/bin/curl"
LOOPBACK = "127.0.0.1,localhost,::1"  # what Go clients never send through a proxy; curl does the same here


@dataclass(frozen=True)
class FirstBytes:
    """One cold blob fetched by curl through a cache: a first client, and one joining its fill."""

    path: str
    image: BenchImage
    blob_bytes: int
    first_ttfb: float  # the first client's time to first byte, following the redirect included
    joining_ttfb: float  # the same for a client started once the first one had bytes
    whole_seconds: float  # the first client's time to its last byte


@dataclass(frozen=True)
class Transfer:
    """curl's timings of one blob GET, in seconds from its start."""

    ttfb: float  # %{time_starttransfer}: summed over the redirect and the final request
    total: float  # %{time_total}


def time_first_bytes(bench: Bench, way: Way, image: BenchImage) -> FirstBytes:
    """The largest layer of `image`, fetched by two curls through the cold cache of `way`."""
    layer = max(image.info.platforms[0].layers, key=lambda blob: blob.size)
    try:
        way.start()
        first, joining = fetch_joined(bench, way.route(), image, layer, way.proc)
    finally:
        way.close()
    return FirstBytes(way.paths[0], image, layer.size, first.ttfb, joining.ttfb, first.total)


def fetch_joined(bench: Bench, route: Route, image: BenchImage, layer: Blob, proxy: Proc | None) -> tuple[Transfer, Transfer]:
    """Start a curl for the blob; once its file has bytes, start a second one; wait for both."""
    files = [bench.workdir / "first-bytes-first", bench.workdir / "first-bytes-joining"]
    timeout = pull_timeout(layer.size)
    deadline = time.monotonic() + timeout
    curls: list[subprocess.Popen[str]] = []
    try:
        curls.append(curl_blob(route, image, layer, files[0]))
        while curls[0].poll() is None and file_size(files[0]) == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if curls[0].poll() is not None or file_size(files[0]) == 0:
            if (alone := curl_result(curls[0], "the first client", layer, files[0], deadline, proxy)) is None:
                raise BenchError(f"the first client had no byte in {timeout:.0f} s")
            raise BenchError(f"the first client had the whole blob ({alone.total:.2f} s) before a second one could join")
        curls.append(curl_blob(route, image, layer, files[1]))
        first = curl_result(curls[0], "the first client", layer, files[0], deadline, proxy)
        joining = curl_result(curls[1], "the joining client", layer, files[1], deadline, proxy)
        if first is None or joining is None:
            raise BenchError(f"the blob took more than {timeout:.0f} s")
        return first, joining
    finally:
        for curl in curls:
            if curl.poll() is None:
                curl.kill()
                curl.wait()
        for path in files:
            path.unlink(missing_ok=True)


def curl_blob(route: Route, image: BenchImage, layer: Blob, dest: Path) -> subprocess.Popen[str]:
    """A GET of the blob as a registry client sends it: through the route's proxy (loopback
    direct, as Go clients do, for hubcache's redirect to its blob server), trusting its CA."""
    argv = [CURL, "-q", "-sS", "--fail", "-L", "--cacert", str(route.ca_bundle), "-o", str(dest), "-w", "%{time_starttransfer} %{time_total}"]
    if route.proxy:
        argv += ["--proxy", route.proxy, "--noproxy", LOOPBACK]
    argv.append(f"https://{route.host}/v2/bench/{image.name}/blobs/{layer.digest}")
    env = {"PATH": CLEAN_PATH}  # no proxy variables (and -q: no .curlrc)
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def curl_result(curl: subprocess.Popen[str], who: str, layer: Blob, dest: Path, deadline: float, proxy: Proc | None) -> Transfer | None:
    """Wait for the curl until `deadline`: its timings, None if it still runs, BenchError if it failed
    or did not write the whole blob."""
    try:
        out, err = curl.communicate(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        return None
    if curl.returncode:
        raise BenchError(f"{who}: curl exited with {curl.returncode}: {last_line(err)}{proxy_state(proxy)}")
    if (size := file_size(dest)) != layer.size:
        raise BenchError(f"{who} got {size} of the blob's {layer.size} bytes")
    ttfb, total = (float(value) for value in out.split())
    return Transfer(ttfb, total)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


# --- results --------------------------------------------------------------------------------


@dataclass
class Results:
    clients: list[str]
    images: list[BenchImage]
    paths: list[str]
    runs: int
    environment: str
    samples: dict[tuple[str, str, str], dict[int, Sample]] = field(default_factory=dict)
    concurrent: list[Concurrent] = field(default_factory=list)
    first_bytes: list[FirstBytes] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, run: int, client: str, image: str, path: str, sample: Sample) -> None:
        self.samples.setdefault((client, image, path), {})[run] = sample

    def series(self, client: str, image: str, path: str) -> dict[int, Sample]:
        return self.samples.get((client, image, path), {})

    def median(self, client: str, image: str, path: str, value: Callable[[Sample], float | None]) -> float | None:
        values = [v for s in self.series(client, image, path).values() if (v := value(s)) is not None]
        return statistics.median(values) if values else None

    def ratio(self, client: str, image: str, path: str, base: str) -> float | None:
        """Median over the runs that have both of path's seconds / base's seconds."""
        a, b = self.series(client, image, path), self.series(client, image, base)
        values = [a[run].seconds / b[run].seconds for run in a.keys() & b.keys()]
        return statistics.median(values) if values else None


def environment() -> str:
    def version(argv: list[str]) -> str:
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        match = re.search(r"\d+\.\d+[\w.+-]*", out)
        return match[0].rstrip(",") if match else "?"

    return (
        f"{os.cpu_count()} CPUs, Linux {platform.release()}; mitmproxy {mitmproxy.version.VERSION}, "
        f"skopeo {version([SKOPEO_BIN, '--version'])}, dockerd {version([DOCKERD_BIN, '--version'])}, "
        f"docker-registry {version([REGISTRY_BIN, '--version'])}"
    )


# --- tables ---------------------------------------------------------------------------------


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    labels: int  # the first `labels` columns are names, the others numbers

    def rich(self) -> rich.table.Table:
        table = rich.table.Table(title=self.title, box=rich.box.SIMPLE_HEAD, title_justify="left")
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i < self.labels else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        align = ["---" if i < self.labels else "---:" for i in range(len(self.columns))]
        lines = [f"**{self.title}**", "", _md_row(self.columns), _md_row(align)]
        return "\n".join(lines + [_md_row(row) for row in self.rows])


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


PULL_COLUMNS = ["client", "image", "path", "s", "MB/s", "x direct", "proxy RSS MiB", "proxy CPU s",
                "CPU s / GiB", "upstream req", "upstream MB", "upstream / image"]
GIB = 2**30


def pulls_table(results: Results) -> Table:
    rows = [
        pull_row(results, client, image, path)
        for client in results.clients
        for image in results.images
        for path in results.paths
    ]
    runs = f"median of {results.runs} runs" if results.runs > 1 else "one run"
    return Table(f"Pulls ({runs}; x direct: the pull's time over the direct pull's)", PULL_COLUMNS, rows, 3)


def pull_row(results: Results, client: str, image: BenchImage, path: str) -> list[str]:
    def median(value: Callable[[Sample], float | None]) -> float | None:
        return results.median(client, image.name, path, value)

    seconds = median(lambda s: s.seconds)
    if seconds is None:
        return [client, image.label, path, "failed", *["-"] * (len(PULL_COLUMNS) - 4)]
    upstream = median(lambda s: s.upstream_bytes) or 0
    cpu = median(lambda s: s.cpu_seconds)
    return [
        client, image.label, path,
        f"{seconds:.2f}",
        f"{image.bytes / MB / seconds:.0f}",
        fmt(results.ratio(client, image.name, path, "direct"), ".2f", "x"),
        fmt(median(lambda s: s.rss_mb), ".0f"),
        fmt(cpu, ".1f"),
        fmt(cpu / (image.bytes / GIB) if cpu is not None else None, ".1f"),  # the proxy's cost of a GiB pulled
        fmt(median(lambda s: s.upstream_requests), ".0f"),
        f"{upstream / MB:.0f}",
        f"{upstream / image.bytes:.2f}",
    ]


def ratios_table(results: Results) -> Table | None:
    pairs = [(a, b) for a, b in RATIOS if a in results.paths and b in results.paths]
    if not pairs:
        return None
    rows = [
        [client, image.label, *(fmt(results.ratio(client, image.name, a, b), ".2f", "x") for a, b in pairs)]
        for client in results.clients
        for image in results.images
    ]
    title = "hubcache against the others (time over time, pull by pull; below 1 hubcache is faster)"
    return Table(title, ["client", "image", *(f"{a} / {b}" for a, b in pairs)], rows, 2)


def concurrency_table(results: Results) -> Table | None:
    if not results.concurrent:
        return None
    columns = ["path", "run", "image", "clients ok", "s", "MB/s (all clients)", "proxy RSS MiB", "proxy CPU s",
               "CPU s / GiB", "clients' CPU s", "upstream req", "upstream MB", "upstream / image"]
    rows = [
        [
            c.path, str(c.run + 1), c.image.label, f"{c.succeeded}/{c.clients}", f"{c.seconds:.2f}",
            f"{c.throughput / MB:.0f}", f"{c.rss_mb:.0f}", f"{c.cpu_seconds:.1f}",
            f"{c.cpu_seconds / (c.succeeded * c.image.bytes / GIB):.2f}" if c.succeeded else "-", f"{c.clients_cpu_seconds:.1f}",
            str(c.upstream_requests), f"{c.upstream_bytes / MB:.0f}", f"{c.upstream_bytes / c.image.bytes:.2f}",
        ]
        for c in results.concurrent  # in the order they ran
    ]
    clients = results.concurrent[0].clients
    title = (f"{clients} skopeo clients pulling one image at once through a cold cache, or a warm one (the warm ways "
             "alternated run by run; CPU per GiB served; clients' CPU: the skopeo processes', on the same cores)")
    return Table(title, columns, rows, 3)


def concurrency_ratios_table(results: Results) -> Table | None:
    """Each warm way's throughput over registry-proxy's in the same run."""
    warm = {(c.path, c.run): c for c in results.concurrent if c.path.endswith(" warm") and c.succeeded == c.clients}
    base = "registry-proxy warm"
    runs = sorted({run for path, run in warm if path == base})
    paths = [p for p in dict.fromkeys(path for path, _ in warm) if p != base]
    if not runs or not paths:
        return None
    rows = []
    for path in paths:
        ratios = [warm[path, run].throughput / warm[base, run].throughput for run in runs if (path, run) in warm]
        if ratios:
            rows.append([path, ", ".join(f"{r:.2f}x" for r in ratios), f"{statistics.median(ratios):.2f}x"])
    title = f"Warm pulls at once: throughput over {base}'s in the same run (above 1 hubcache is faster)"
    return Table(title, ["path", "run by run", "median"], rows, 1)


def first_bytes_table(results: Results) -> Table | None:
    if not results.first_bytes:
        return None
    columns = ["path", "blob", "first client TTFB s", "joining client TTFB s", "whole blob s"]
    rows = [
        [f.path, f"{f.image.name}'s largest layer, {f.blob_bytes / MB:.0f} MB", f"{f.first_ttfb:.3f}", f"{f.joining_ttfb:.3f}",
         f"{f.whole_seconds:.2f}"]
        for f in results.first_bytes
    ]  # fmt: skip
    title = ("Time to first byte of a cold blob (curl, one run): a first client, and one joining its fill once the first "
             "has bytes; whole blob: the first client's time to its last byte")  # fmt: skip
    return Table(title, columns, rows, 2)


def tables(results: Results) -> list[Table]:
    every = (pulls_table(results), ratios_table(results), concurrency_table(results), concurrency_ratios_table(results),
             first_bytes_table(results))
    return [t for t in every if t]


def markdown(results: Results) -> str:
    parts = [
        f"Machine: {results.environment}. Images (incompressible layers): {images(results)}.",
        "Every pull has a fresh proxy process (a warm one on the cache its cold one filled). Proxy RSS: "
        "the peak resident memory of the proxy process, plus that of its children if any; proxy CPU: their "
        "user+system seconds during the pull, and per GiB of image pulled; upstream: what the upstream registry "
        "served (GET body bytes).",
        *(t.markdown() for t in tables(results)),
    ]
    if results.errors:
        parts.append("Failures:\n\n" + "\n".join(f"- {e}" for e in results.errors))
    return "\n\n".join(parts) + "\n"


def images(results: Results) -> str:
    return ", ".join(image.shape for image in results.images)


def show(results: Results) -> None:
    console.print(f"[dim]{results.environment}; images: {images(results)}[/dim]")
    for table in tables(results):
        console.print(table.rich())
    for error in results.errors:
        console.print(f"[red]failed:[/red] {error}", highlight=False)


# --- running --------------------------------------------------------------------------------


def run(options: argparse.Namespace) -> Results:
    workdir = Path(tempfile.mkdtemp(prefix="hubcache-bench-"))
    try:
        with ExitStack() as stack:
            if options.hold_memory:
                hold_memory(stack)
            elif PAGE_REPORTING.exists():
                progress.print("[yellow]this kernel reports freed memory to its hypervisor: if the host takes it back, a "
                               "pull that allocates it again pays for it (--hold-memory, as root, evens that out)[/yellow]")
            progress.print(f"[dim]work folder {workdir}; building and pushing the images[/dim]")
            bench = Bench(workdir, SMALL_IMAGES if options.small else FULL_IMAGES, stack)
            held = "; free page reporting held off" if options.hold_memory else ""
            results = Results(
                options.clients, bench.images, [p for w in options.ways for p in WAYS[w].paths], options.runs, environment() + held
            )
            clients = [SkopeoClient(workdir) if name == "skopeo" else DockerClient(workdir) for name in options.clients]
            for client in clients:
                stack.callback(client.close)
            for run_index in range(options.runs):
                for image in bench.images:
                    for client in clients:
                        for way in options.ways:
                            measure_way(bench, results, run_index, client, image, way)
            if options.concurrency:
                measure_concurrent(bench, results, [w for w in ("hubcache", "registry-proxy") if w in options.ways], options)
                warm = [w for w in WARM_AT_ONCE if w in options.ways]
                measure_concurrent(bench, results, warm, options, warm=True, runs=options.runs)
            for way in [w for w in ("hubcache", "registry-proxy") if w in options.ways and options.first_bytes]:
                measure_first_bytes(bench, results, way)
    finally:
        if options.keep:
            progress.print(f"work folder kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")
NO_REPORTING = "11"  # an order above the buddy allocator's largest (10): no free block is reported
MEMORY_MARGIN = 2 * GIB  # left free while the rest is touched
TOUCH_SPAN = 256 * 2**20


def hold_memory(stack: ExitStack) -> None:
    """Hold free page reporting off until `stack` closes, then touch the free memory once: every
    page the run allocates is then backed by the host, whichever path allocates it."""
    try:
        order = PAGE_REPORTING.read_text().strip()
        PAGE_REPORTING.write_text(NO_REPORTING)
    except OSError as e:
        raise BenchError(f"--hold-memory: cannot hold off free page reporting in {PAGE_REPORTING}: {e.strerror or e}") from e
    stack.callback(PAGE_REPORTING.write_text, order)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    free = int(meminfo["MemFree"].split()[0]) * 1024 - MEMORY_MARGIN
    started = time.monotonic()
    spans: list[mmap.mmap] = []
    try:
        while len(spans) * TOUCH_SPAN < free:  # held together: each span gets pages of its own
            spans.append(mmap.mmap(-1, TOUCH_SPAN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE))
    finally:
        for span in spans:
            span.close()
    seconds = time.monotonic() - started
    progress.print(f"[dim]free page reporting held off; {len(spans) * TOUCH_SPAN / GIB:.0f} GiB touched in {seconds:.0f} s[/dim]")


def measure_way(bench: Bench, results: Results, run_index: int, client: Client, image: BenchImage, way: str) -> None:
    where = f"run {run_index + 1}, {client.name}, {image.name}"
    try:
        for path, sample in measure(bench, WAYS[way](bench), client, image):
            results.add(run_index, client.name, image.name, path, sample)
            progress.print(f"[dim]{where}, {path}: {sample.seconds:.2f} s[/dim]", highlight=False)
    except (BenchError, ProcError, RuntimeError, OSError) as e:
        results.errors.append(f"{where}, {way}: {first_line(e)}")
        progress.print(f"[red]{results.errors[-1]}[/red]", highlight=False)


WARM_AT_ONCE = ("hubcache", "hubcache-https", "hubcache-mirror-net", "registry-proxy")  # many clients, warm


def measure_concurrent(bench: Bench, results: Results, names: list[str], options: argparse.Namespace, warm: bool = False,
                       runs: int = 1) -> None:
    """Pulls at once through each way of `names`; warm, `runs` times, the ways alternated so
    that the machine's moods fall on each alike (each cache filled once, a new proxy each time)."""
    image = bench.images[0]  # the multi-layer one
    clients = options.concurrency
    ways: dict[str, Way] = {}
    try:
        for name in names:
            ways[name] = WAYS[name](bench)
            if warm:
                try:
                    fill_once(bench, ways[name], image)
                except (BenchError, ProcError, RuntimeError, OSError) as e:
                    results.errors.append(f"{clients} clients at once, {name} warm: filling: {first_line(e)}")
                    del ways[name]
        for run in range(runs):
            for name, way in ways.items():
                try:
                    result, errors = measure_at_once(bench, way, image, clients, run, warm)
                except (BenchError, ProcError, RuntimeError, OSError) as e:
                    errors = [first_line(e)]
                else:
                    results.concurrent.append(result)
                    progress.print(f"[dim]{clients} clients at once, {result.path}: {result.seconds:.2f} s[/dim]", highlight=False)
                results.errors += [f"{clients} clients at once, {name}{' warm' if warm else ''}: {e}" for e in sorted(set(errors))]
    finally:
        for way in ways.values():
            way.close()


def measure_first_bytes(bench: Bench, results: Results, way: str) -> None:
    image = next(image for image in bench.images if image.name == "big")
    try:
        result = time_first_bytes(bench, WAYS[way](bench), image)
    except (BenchError, ProcError, RuntimeError, OSError) as e:
        results.errors.append(f"first bytes, {way}: {first_line(e)}")
        progress.print(f"[red]{results.errors[-1]}[/red]", highlight=False)
        return
    results.first_bytes.append(result)
    progress.print(
        f"[dim]first bytes, {result.path}: first client {result.first_ttfb:.3f} s, joining client {result.joining_ttfb:.3f} s, "
        f"whole blob {result.whole_seconds:.2f} s[/dim]",
        highlight=False,
    )


def comma_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)} (got {text!r})")
        return [c for c in choices if c in items]  # table order

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Pull the same images over every path (direct, plain mitmdump, hubcache cold/warm, "
        "the registry's proxy mode cold/warm) with skopeo and dockerd; print medians and ratios.",
    )
    parser.add_argument("--runs", type=int, help="repetitions of every pull, and of the warm pulls at once (default 3; 1 with --small)")
    parser.add_argument("--small", action="store_true", help="short version for CI: a 30 MB and a 100 MB image")
    parser.add_argument("--clients", type=comma_list(CLIENTS), default=list(CLIENTS), help="default: skopeo,docker")
    parser.add_argument(
        "--paths", dest="ways", type=comma_list(tuple(WAYS)), default=list(WAYS),
        help=f"default: {','.join(WAYS)} (a cache gives a cold and a warm path)",
    )  # fmt: skip
    parser.add_argument(
        "--concurrency", type=int, default=16, metavar="N",
        help="skopeo clients pulling the multi-layer image at once through each cold cache and each warm one (default 16; 0: skip)",
    )  # fmt: skip
    parser.add_argument(
        "--first-bytes", action=argparse.BooleanOptionalAction, default=True,
        help="time to first byte of the big image's largest layer through each cold cache, for a first client "
        "and one joining its fill (curl; default on)",
    )  # fmt: skip
    parser.add_argument(
        "--hold-memory", action="store_true",
        help="in a VM with free page reporting (root): hold the reporting off during the run and touch the "
        "free memory once first, so that no path pays the hypervisor for memory another path freed",
    )  # fmt: skip
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the tables as markdown")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    options = parser.parse_args(argv)
    options.runs = options.runs or (1 if options.small else 3)
    if options.runs < 1 or options.concurrency < 0:
        parser.error("--runs must be at least 1 and --concurrency at least 0")
    return options


def check_tools(options: argparse.Namespace) -> None:
    """Leave docker out when it cannot run; fail early on a missing tool."""
    if "docker" in options.clients and (os.geteuid() != 0 or not Path(DOCKERD_BIN).exists()):
        progress.print(f"[yellow]skipping the docker client: dockerd needs root and {DOCKERD_BIN}[/yellow]")
        options.clients.remove("docker")
    for tool in (SKOPEO_BIN, REGISTRY_BIN, MITMDUMP):
        if not Path(tool).exists():
            raise BenchError(f"{tool} is missing (.ci/run installs the tools)")
    if not options.clients:
        raise BenchError("no client left to run")


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        check_tools(options)
        results = run(options)
    except (BenchError, ProcError, RuntimeError, OSError) as e:
        progress.print(f"[red]bench: {first_line(e)}[/red] (--keep keeps the logs)", highlight=False)
        return 2
    show(results)
    if options.markdown:
        options.markdown.write_text(markdown(results))
    return 1 if results.errors else 0


if __name__ == "__main__":
    # Stopped from outside: still run the finally blocks that stop every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
