"""Store scale benchmark: how the commands that read the whole store grow with its size.

For each size it builds a store through the store's own API (one image manifest per ten blobs:
a config and nine layers, one tag per manifest, blobs of 64 bytes, tags spread over 100
repositories), then times, as an operator would run them:

- `hubcache stats`, `hubcache ls` (what it prints first) and `hubcache rm --dry-run` of one tag,
  each a fresh process;
- the status page's summary: the first `Store.summary()` of a freshly opened store, in process;
- an eviction pass removing 1 % of the blobs: `hubcache prune --to` 99 % of the blob bytes;
- the data path's warm lookups: the median of a tag, its manifest and one of its blobs opened;
- the first open of a store written before hubcache kept its indexes (their tables dropped):
  the one-time indexing;
- a real proxy (mitmdump with the addon, loopback only, `offline=true`) on the store, its blobs'
  last use set two hours back and `cache_size_limit` at 99 % of the blob bytes, so its first
  upkeep pass (EVICT_INTERVAL after start) evicts 1 %: the proxy's RSS, its anonymous part and
  its maps of the store's database (from /proc/<pid>/status and smaps) at rest and at their
  highest during the pass, the pass's length (from its first slice's debug line to its result
  line), the latency of warm manifest HEADs of a cached tag sent one after another through its
  proxy port over one TLS connection, at rest and during the pass (median and max), and the
  event loop's lags over 50 ms at rest and during the pass, from the proxy's own probe (its
  debug lines), with the longest lag since start from its status page;
- `hubcache import` of the store's images (one per tag, IMPORT_IMAGES at most) into an empty
  cache folder, from OCI archives of IMPORT_BUNDLE images written with the bundle module's
  `export` (the import runs added up).

Stores are built in transactions of BUILD_BATCH images through the store's `batch()`.
Each figure goes to stderr as it is measured; at the end it prints one row per figure with the
growth factor between successive sizes. Each command
gets at most --timeout seconds (shown as `>N s`), so a run stays bounded. Stores are built under a
temporary folder and removed at the end.

    scripts/bench_store --sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sqlite3
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from itertools import pairwise
from pathlib import Path

from hubcache.storage.bundle import export
from hubcache.storage.eviction import EVICT_INTERVAL
from hubcache.storage.recordings import image_from_store
from hubcache.storage.store import Store

REGISTRY = "bench.example"
BLOBS_PER_MANIFEST = 10
BLOB_BYTES = 64
REPOSITORIES = 100
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CLI = [sys.executable, "-c", "from hubcache.cli import main; main()"]
MITMDUMP = Path(sys.executable).with_name("mitmdump")
SCRIPT = Path(__file__).resolve().parents[1] / "addon" / "script.py"
BUILD_BATCH = 100  # images per transaction while building
IMPORT_IMAGES = 10_000  # images in the archive for `hubcache import` at most
# A bundle holds 250 000 members at most (storage/bundle.py's MAX_MEMBERS): the 10^4 images of
# ten blobs and a manifest each fit in one.
IMPORT_BUNDLE = 10_000
REST_MARGIN = 0.5  # seconds before an upkeep pass's first slice line that count as at rest no more
STALL_LINE = re.compile(r"event loop stalled: a timer ran (\d+) ms late")  # observe/loop_lag.py, at debug level
STATUS_LINE = re.compile(r"status page on (http://\S+/) ")
BACKDATE = 7200.0  # seconds the blobs' last use is set back: older than what upkeep counts as in use


def blob(n: int) -> tuple[str, bytes]:
    data = n.to_bytes(8, "big") * (BLOB_BYTES // 8)
    return "sha256:" + hashlib.sha256(data).hexdigest(), data


def manifest(blobs: list[tuple[str, bytes]]) -> bytes:
    def descriptor(digest: str, data: bytes, media_type: str) -> dict:
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    config, *layers = blobs
    document = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(*config, "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor(*layer, "application/vnd.oci.image.layer.v1.tar") for layer in layers],
    }
    return json.dumps(document, sort_keys=True).encode()


def build(directory: Path, blobs: int) -> float:
    """A store of `blobs` blobs, a tenth as many manifests and tags; seconds it took."""
    start = time.perf_counter()
    store = Store(directory)
    try:
        manifests = blobs // BLOBS_PER_MANIFEST
        for first in range(0, manifests, BUILD_BATCH):
            with store.batch():
                for m in range(first, min(first + BUILD_BATCH, manifests)):
                    held = [blob(m * BLOBS_PER_MANIFEST + i) for i in range(BLOBS_PER_MANIFEST)]
                    for digest, data in held:
                        writer = store.blob_writer(digest)
                        writer.write(data)
                        writer.close()
                        writer.commit()
                    body = manifest(held)
                    digest = "sha256:" + hashlib.sha256(body).hexdigest()
                    store.put_manifest(digest, OCI_MANIFEST, body)
                    store.set_tag(REGISTRY, f"team/app{m % REPOSITORIES}", f"v{m}", digest)
        for r in range(REPOSITORIES):
            store.set_visibility(REGISTRY, f"team/app{r}", True)  # as a fill from a public repository records
    finally:
        store.close()
    return time.perf_counter() - start


def command(args: list[str], timeout: float) -> float | None:
    """Seconds a hubcache command took; None if it ran out of time. It must succeed."""
    start = time.perf_counter()
    try:
        subprocess.run([*CLI, *args], check=True, stdout=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    return time.perf_counter() - start


def first_summary(directory: Path) -> float:
    store = Store(directory)
    try:
        start = time.perf_counter()
        store.summary()
        return time.perf_counter() - start
    finally:
        store.close()


def warm_lookup(directory: Path, manifests: int) -> float:
    """The median time of one tag, manifest and blob lookup, as the data path makes them."""
    store = Store(directory)
    times = []
    try:
        for m in range(0, manifests, max(1, manifests // 500)):
            start = time.perf_counter()
            tag = store.get_tag(REGISTRY, f"team/app{m % REPOSITORIES}", f"v{m}")
            assert tag is not None
            held = store.get_manifest(tag.digest)
            assert held is not None
            with store.open_blob(blob(m * BLOBS_PER_MANIFEST)[0]) as f:
                f.read()
            times.append(time.perf_counter() - start)
    finally:
        store.close()
    return statistics.median(times)


class Proxy:
    """A hubcache proxy (mitmdump with the addon) on loopback, its log lines read as they come."""

    def __init__(self, directory: Path, limit: int):
        self.confdir = directory.parent / f"conf-{directory.name}"
        self.port = free_port()
        self.lines: list[tuple[float, str]] = []
        # (when, RSS, its anonymous part, the part of it mapping the store's database): between
        # requests and at each upkeep line
        self.rss_samples: list[tuple[float, int, int, int]] = []
        self.changed = threading.Condition()
        args = [str(MITMDUMP), "-s", str(SCRIPT), "--listen-host", "127.0.0.1", "--listen-port", str(self.port)]
        options = {
            "confdir": self.confdir,
            "cache_dir": directory,
            "registries": REGISTRY,
            "offline": "true",  # answers from the store only: no upstream to wait for
            "cache_size_limit": limit,
            "status_listen": "127.0.0.1:0",
            "termlog_verbosity": "debug",  # the upkeep pass logs each slice
        }
        for name, value in options.items():
            args += ["--set", f"{name}={value}"]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            if "hubcache: evict" in line:
                self.sample_rss()
            with self.changed:
                self.lines.append((time.monotonic(), line))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, text: str, deadline: float) -> float:
        """When the first log line holding `text` came; raises if it does not come in time."""
        with self.changed:
            while True:
                for when, line in self.lines:
                    if text in line:
                        return when
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    log = "".join(line for _, line in self.lines[-30:])
                    raise RuntimeError(f"no {text!r} from the proxy:\n{log}")
                self.changed.wait(left)

    def sample_rss(self) -> None:
        """Note its resident set size now."""
        try:
            self.rss_samples.append((time.monotonic(), self._status("VmRSS"), self._status("RssAnon"), self._database_rss()))
        except OSError:
            pass  # it has just ended

    def peak_rss(self) -> int:
        """The highest resident set size it has had."""
        return self._status("VmHWM")

    def _database_rss(self) -> int:
        """Resident bytes of its mappings of the store's database file (SQLite's mmap, one per
        connection), from /proc/<pid>/smaps."""
        total, in_database = 0, False
        with open(f"/proc/{self.proc.pid}/smaps") as f:
            for line in f:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    in_database = line.rstrip().endswith("/cache.db")
                elif in_database and first == "Rss:":
                    total += int(line.split()[1]) * 1024
        return total

    def _status(self, field: str) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/{self.proc.pid}/status")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backdate(directory: Path) -> None:
    """Set every entry's last use BACKDATE seconds back, as in a store left alone for a while:
    upkeep spares what was used lately."""
    with sqlite3.connect(directory / "content" / "cache.db") as db:
        db.execute("UPDATE Cache SET access_time = access_time - ?", (BACKDATE,))


def upkeep_in_proxy(directory: Path, blobs: int, timeout: float) -> dict[str, float | None]:
    """RSS and request latency of a proxy at rest and during an upkeep pass that evicts 1 %."""
    backdate(directory)
    store = Store(directory)
    try:
        held = store.summary().blob_bytes
    finally:
        store.close()
    proxy = Proxy(directory, limit=held * 99 // 100)
    try:
        deadline = time.monotonic() + 60
        proxy.wait_for("hubcache: blob server on", deadline)
        proxy.wait_for("hubcache: status page on", deadline)
        last = blobs // BLOBS_PER_MANIFEST - 1  # the most recently used image: never evicted
        path = f"/v2/team/app{last % REPOSITORIES}/manifests/v{last}"
        context = ssl.create_default_context(cafile=str(proxy.confdir / "mitmproxy-ca-cert.pem"))
        connection = http.client.HTTPSConnection("127.0.0.1", proxy.port, context=context, timeout=30)
        connection.set_tunnel(REGISTRY, 443)
        requests: list[tuple[float, float]] = []  # (sent, seconds)
        proxy.sample_rss()
        deadline = time.monotonic() + EVICT_INTERVAL + timeout
        finished = "hubcache: evicted "
        while not any(finished in line for _, line in proxy.lines):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no upkeep pass ended within {EVICT_INTERVAL + timeout:.0f} s")
            sent = time.monotonic()
            connection.request("HEAD", path, headers={"Accept": OCI_MANIFEST})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"HEAD {path}: {response.status}")
            now = time.monotonic()
            requests.append((sent, now - sent))
            proxy.sample_rss()
        connection.close()
        began = proxy.wait_for("hubcache: evicting: ", deadline)
        ended = proxy.wait_for(finished, deadline)
        status_url = next(m.group(1) for _, line in proxy.lines if (m := STATUS_LINE.search(line)))
        with urllib.request.urlopen(status_url + "status.json", timeout=30) as response:
            loop = json.load(response)["event_loop"]
        # The proxy's own probe logs each event loop lag over 50 ms as it ends. At rest: after the
        # first HEAD (its TLS set-up and certificate are on the loop) until the margin before the pass.
        stalls = [(when, int(m.group(1)) / 1000) for when, line in proxy.lines if (m := STALL_LINE.search(line))]
        settled = requests[0][0] + requests[0][1]
        rest_stalls = [lag for when, lag in stalls if settled <= when < began - REST_MARGIN]
        pass_stalls = [lag for when, lag in stalls if began - REST_MARGIN <= when <= ended + 0.1]
        # The first slice's line comes when that slice is done: leave a margin before it at rest,
        # and count every request that overlapped the pass's slices as during it.
        at_rest = [seconds for sent, seconds in requests[1:] if sent + seconds < began - REST_MARGIN]  # the first sets up TLS
        during = [seconds for sent, seconds in requests if sent <= ended and sent + seconds >= began]
        rest = [s for s in proxy.rss_samples if s[0] < began - REST_MARGIN]
        during_pass = [s for s in proxy.rss_samples if began <= s[0] <= ended + 0.1]
        return {
            "proxy: upkeep pass removing 1 %": ended - began,
            "proxy RSS at rest (MB)": proxy_mb(max(s[1] for s in rest)),
            "proxy RSS during the pass, highest (MB)": proxy_mb(max(s[1] for s in during_pass)),
            # What the process itself allocated, without the database's pages it maps (RssFile).
            "proxy RSS anonymous at rest (MB)": proxy_mb(max(s[2] for s in rest)),
            "proxy RSS anonymous during the pass (MB)": proxy_mb(max(s[2] for s in during_pass)),
            # Its mappings of the database (SQLite's mmap, one per connection, so per thread).
            "proxy RSS of the database mappings at rest (MB)": proxy_mb(max(s[3] for s in rest)),
            "proxy RSS of the database mappings during the pass (MB)": proxy_mb(max(s[3] for s in during_pass)),
            "proxy manifest HEAD at rest (median)": statistics.median(at_rest) if at_rest else None,
            "proxy manifest HEAD at rest (max)": max(at_rest, default=None),
            "proxy manifest HEAD during the pass (median)": statistics.median(during) if during else None,
            "proxy manifest HEAD during the pass (max)": max(during, default=None),
            "proxy: HEADs during the pass (count)": float(len(during)),
            "proxy event loop: seconds at rest watched": began - REST_MARGIN - settled,
            "proxy event loop: lags over 50 ms at rest (count)": float(len(rest_stalls)),
            "proxy event loop: longest lag over 50 ms at rest": max(rest_stalls, default=None),
            "proxy event loop: lags over 50 ms during the pass (count)": float(len(pass_stalls)),
            "proxy event loop: longest lag over 50 ms during the pass": max(pass_stalls, default=None),
            "proxy event loop: longest lag since start (status page)": loop["longest_lag"],
            "proxy RSS, highest since start (MB)": proxy_mb(proxy.peak_rss()),
        }
    finally:
        proxy.stop()


def proxy_mb(size: int) -> float:
    return size / 1e6


def import_all(directory: Path, timeout: float) -> tuple[float | None, int]:
    """Seconds `hubcache import` took to load the store's tagged images (IMPORT_IMAGES at most)
    into an empty cache folder, IMPORT_BUNDLE images per archive, and how many images it loaded."""
    target = directory.parent / f"{directory.name}-imported"
    archives = []
    store = Store(directory)
    try:
        images = [image for name, _ in store.tags()[:IMPORT_IMAGES] if (image := image_from_store(store, *name))]
        for first in range(0, len(images), IMPORT_BUNDLE):
            archives.append(directory.parent / f"{directory.name}-{first}.tar")
            export(store, images[first : first + IMPORT_BUNDLE], archives[-1])
    finally:
        store.close()
    try:
        total = 0.0
        for archive in archives:
            took = command(["import", "--cache-dir", str(target), str(archive)], timeout)
            if took is None:
                return None, len(images)
            total += took
        return total, len(images)
    finally:
        for archive in archives:
            archive.unlink()
        shutil.rmtree(target, ignore_errors=True)


def first_open_unindexed(directory: Path) -> float:
    """Drop the kept indexes (as a store written before them has none) and time the first open."""
    with sqlite3.connect(directory / "content" / "cache.db") as db:
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE 'hc\\_%' ESCAPE '\\'").fetchall():
            db.execute(f"DROP TABLE {name}")
    start = time.perf_counter()
    Store(directory).close()
    return time.perf_counter() - start


class Figures(dict[str, float | None]):
    """A size's figures, each shown as it comes (a run stopped midway still says what it measured)."""

    def __init__(self, blobs: int, timeout: float):
        super().__init__()
        self.blobs, self.timeout = blobs, timeout

    def __setitem__(self, figure: str, value: float | None) -> None:
        super().__setitem__(figure, value)
        print(f"{self.blobs} blobs: {figure} {shown(figure, value, self.timeout)}", file=sys.stderr, flush=True)


def measure(directory: Path, blobs: int, timeout: float) -> dict[str, float | None]:
    figures = Figures(blobs, timeout)
    figures["build store"] = build(directory, blobs)
    where = ["--cache-dir", str(directory)]
    figures["hubcache stats"] = command(["stats", *where], timeout)
    figures["hubcache ls"] = command(["ls", *where], timeout)
    middle = blobs // BLOBS_PER_MANIFEST // 2
    figures["hubcache rm --dry-run (1 tag)"] = command(["rm", "--dry-run", *where, f"{REGISTRY}/team/app{middle % REPOSITORIES}:v{middle}"], timeout)
    figures["status page: first summary"] = first_summary(directory)
    target = blobs * BLOB_BYTES * 99 // 100
    figures["warm tag+manifest+blob lookup (median)"] = warm_lookup(directory, blobs // BLOBS_PER_MANIFEST)
    figures["prune removing 1 %"] = command(["prune", *where, "--to", str(target)], timeout)
    figures["hubcache import (the images below)"], images = import_all(directory, timeout)
    figures["images imported (count)"] = float(images)
    for figure, value in upkeep_in_proxy(directory, blobs, timeout).items():
        figures[figure] = value
    figures["first open of an unindexed store"] = first_open_unindexed(directory)
    return figures


def shown(figure: str, seconds: float | None, timeout: float) -> str:
    if figure.endswith("(MB)") and seconds is not None:
        return f"{seconds:.0f} MB"
    if figure.endswith("(count)") and seconds is not None:
        return f"{seconds:.0f}"
    if seconds is None:
        return "-" if figure.startswith(("proxy manifest HEAD", "proxy event loop")) else f">{timeout:.0f} s"
    if seconds < 0.01:
        return f"{seconds * 1000:.2f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="blob counts, comma-separated (default 1000,10000)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds each command may take (default 300)")
    parser.add_argument("--json", dest="as_json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results: dict[int, dict[str, float | None]] = {}
    root = Path(tempfile.mkdtemp(prefix="hubcache-bench-store-"))
    try:
        for n in sizes:
            results[n] = measure(root / str(n), n, args.timeout)
            shutil.rmtree(root / str(n))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.as_json:
        print(json.dumps({str(n): r for n, r in results.items()}, indent=2))
        return
    header = ["figure", *(f"{n} blobs ({n // BLOBS_PER_MANIFEST} tags)" for n in sizes)]
    header += [f"growth {a}->{b}" for a, b in pairwise(sizes)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for figure in results[sizes[0]]:
        row = [figure, *(shown(figure, results[n][figure], args.timeout) for n in sizes)]
        for a, b in pairwise(sizes):
            x, y = results[a][figure], results[b][figure]
            row.append(f"x{y / x:.1f}" if x and y else "-")
        print("| " + " | ".join(row) + " |")
    print(f"\n{os.cpu_count()} cores; python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
