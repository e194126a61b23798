"""The `hubcache` command line."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import click
import yaml

CA_CERT = "mitmproxy-ca-cert.pem"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hubcache: a transparent pull-through cache for container registries (a mitmproxy addon).

    Every subcommand finds the cache folder in --cache-dir, else $HUBCACHE_CACHE_DIR, else the
    `cache_dir` of the --config file, else ./cache.
    """


def cache_dir_option(command):
    return click.option(
        "--cache-dir",
        envvar="HUBCACHE_CACHE_DIR",
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder of the content store, the recordings and the miss journal  [default: cache]",
    )(command)


def config_option(command):
    return click.option(
        "--config",
        "config_file",
        envvar="HUBCACHE_CONFIG",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="YAML file of option: value pairs (any mitmproxy or hubcache option); the command line wins.",
    )(command)


def proxy_options(command):
    """The options of the commands that run the proxy (run, prefetch)."""
    for option in reversed(
        [
            click.option(
                "--confdir",
                default="certs",
                show_default=True,
                type=click.Path(file_okay=False, path_type=Path),
                help="mitmproxy's confdir: the CA clients must trust is generated here on first start.",
            ),
            click.option("--record", metavar="NAME", help="Add every pulled image to the recording NAME."),
            click.option(
                "--set",
                "settings",
                multiple=True,
                metavar="NAME=VALUE",
                help="Any mitmproxy or hubcache option, as for mitmdump (repeatable).",
            ),
        ]
    ):
        command = option(command)
    return config_option(cache_dir_option(command))


@main.command()
@proxy_options
@click.option("--listen-host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--listen-port", default=3128, show_default=True, type=int, help="Port to listen on.")
def run(
    cache_dir: Path | None,
    config_file: Path | None,
    confdir: Path,
    record: str | None,
    settings: tuple[str, ...],
    listen_host: str,
    listen_port: int,
) -> None:
    """Start the cache: mitmdump with the hubcache addon and these defaults.

    \b
    Examples:
      hubcache run
      hubcache run --listen-port 3129 --cache-dir /var/cache/hubcache
      hubcache run --set tag_freshness=300 --set registries=registry-1.docker.io
      hubcache run --record ci-images        # note every pulled image in a recording
      hubcache run --set offline=true        # serve only what the cache holds
    """
    options = _options(cache_dir, config_file, confdir, record, settings)
    ca_cert = _make_ca(confdir)
    click.echo(instructions(listen_host, listen_port, ca_cert), err=True)
    args = ["--listen-host", listen_host, "--listen-port", str(listen_port)]
    for setting in options:
        args += ["--set", setting]
    _mitmdump_with_hubcache(args)


@main.command()
@proxy_options
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="OS/ARCH[/VARIANT]",
    help="Only these platforms of a multi-platform image (repeatable)  [default: every platform]",
)
def prefetch(
    cache_dir: Path | None,
    config_file: Path | None,
    confdir: Path,
    record: str | None,
    settings: tuple[str, ...],
    images: tuple[str, ...],
    platforms: tuple[str, ...],
) -> None:
    """Fill the cache with IMAGES from upstream, without any container engine.

    hubcache runs inside this command and the images are pulled through it, so all of its options
    (registries, upstream_map, upstream proxy, trusted CAs) apply. Prepare an air-gapped site with
    --record, then `hubcache export --recording NAME`.

    \b
    Examples:
      hubcache prefetch alpine:3.20 nginx
      hubcache prefetch --platform linux/amd64 --platform linux/arm64 ghcr.io/org/app:1.4
      hubcache prefetch --record lab python:3.12-slim postgres:16
    """
    from . import prefetch as pf
    from .progress import LayerBars, console

    options = _options(cache_dir, config_file, confdir, record, settings)
    ca_cert = _make_ca(confdir)
    results = []
    try:
        with pf.LocalProxy(options) as proxy, LayerBars() as bars:
            if proxy.options.offline:
                raise click.ClickException("prefetch fetches from upstream; it cannot run with offline=true")
            client = pf.RegistryClient(proxy.url, ca_cert)
            for image in images:
                results.append(pf.prefetch(proxy, client, image, list(platforms), bars))
    except click.ClickException:
        raise
    except Exception as e:  # mitmproxy's OptionsError, or a proxy that could not start
        raise click.ClickException(str(e))
    console.print(_prefetch_table(results))
    failed = [r for r in results if r.error]
    for r in failed:
        click.echo(f"Error: {r.error}", err=True)
    if failed:
        raise SystemExit(1)


def _prefetch_table(results):
    from rich.table import Table

    from .progress import size

    table = Table("image", "digest", "platforms", "fetched", "already cached", title="prefetch")
    for r in results:
        if r.error:
            table.add_row(r.image, "[red]failed[/red]", "", "", "")
        else:
            fetched = f"{r.fetched} blobs, {size(r.fetched_bytes)}"
            table.add_row(r.image, r.digest[:19], ", ".join(r.platforms), fetched, f"{r.held} blobs")
    return table


@main.command("export")
@cache_dir_option
@config_option
@click.argument("images", nargs=-1)
@click.option("--recording", "-r", metavar="NAME", help="Export the images of this recording.")
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The bundle to write: a tar of an OCI image layout.",
)
def export_command(
    cache_dir: Path | None, config_file: Path | None, images: tuple[str, ...], recording: str | None, output: Path
) -> None:
    """Write a recording, or IMAGES held in the cache, to one portable file.

    The file is a standard OCI image layout in a tar: `hubcache import` loads it into another
    cache, and skopeo, podman, crane or containerd read it as well, for instance
    `skopeo copy oci-archive:FILE:docker.io/library/alpine:3.20 dir:out`.

    \b
    Examples:
      hubcache export --recording lab -o lab.tar
      hubcache export alpine:3.20 ghcr.io/org/app:1.4 -o images.tar
    """
    from .bundle import BundleError, export
    from .progress import ByteBar, count, size
    from .recording import image_from_store

    if bool(images) == bool(recording):
        raise click.UsageError("give either IMAGES or --recording NAME")
    with _store(cache_dir, config_file) as (store, folder):
        if recording:
            chosen = list(_recording(folder, recording).images.values())
        else:
            chosen = []
            for text in images:
                ref = _image_reference(text)
                image = image_from_store(store, ref.registry, ref.repository, ref.reference)
                if image is None:
                    raise click.ClickException(f"{ref} is not in the cache at {folder}")
                chosen.append(image)
        total = sum(size for image in chosen for size in image.blobs().values())
        try:
            with ByteBar(f"exporting {output.name}", total) as bar:
                summary = export(store, chosen, output, recording or "", bar.advance)
        except BundleError as e:
            raise click.ClickException(str(e))
        except OSError as e:
            raise click.ClickException(f"cannot write {output}: {e.strerror or e}")
    click.echo(
        f"{output}: {count(len(summary.images), 'image')}, {count(summary.manifests, 'manifest')}, "
        f"{count(summary.blobs, 'blob')} ({size(summary.bytes)})"
    )


@main.command("import")
@cache_dir_option
@config_option
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
def import_command(cache_dir: Path | None, config_file: Path | None, bundle: Path) -> None:
    """Load a bundle written by `hubcache export` (or any OCI archive whose entries are named
    registry/repository:tag) into the cache, verifying every digest first.

    Nothing is stored unless all of it verifies: a corrupt or truncated file is refused and leaves
    the cache as it was. A recording carried in the bundle is created in the cache as well.

    \b
    Examples:
      hubcache import lab.tar
      hubcache import --cache-dir /var/cache/hubcache lab.tar
    """
    from .bundle import BundleError, import_bundle
    from .progress import ByteBar, count, size

    with _store(cache_dir, config_file) as (store, folder):
        try:
            with ByteBar(f"verifying {bundle.name}", bundle.stat().st_size) as bar:
                summary = import_bundle(store, bundle, folder, bar.advance)
        except BundleError as e:
            raise click.ClickException(f"{e}; the cache is unchanged")
        except OSError as e:
            raise click.ClickException(f"cannot import into {folder}: {e.strerror or e}")
    click.echo(
        f"imported {count(len(summary.images), 'image')} ({', '.join(summary.images)}): "
        f"{count(summary.manifests, 'manifest')}, {count(summary.blobs, 'new blob')} ({size(summary.bytes)}), "
        f"{summary.already_held} already held"
    )


@main.command()
@cache_dir_option
@config_option
@click.argument("name", required=False)
def recordings(cache_dir: Path | None, config_file: Path | None, name: str | None) -> None:
    """List the recordings, or show the recording NAME: its images, digests, size, and what the
    cache lacks of it.

    \b
    Examples:
      hubcache recordings
      hubcache recordings lab
    """
    from rich.table import Table

    from . import recording as rec
    from .progress import console, size

    with _store(cache_dir, config_file) as (store, folder):
        if name is None:
            table = Table("recording", "images", "size", "missing from the cache", "updated")
            for each in rec.names(folder):
                r = _recording(folder, each)
                updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.path.stat().st_mtime))
                table.add_row(each, str(len(r.images)), size(r.total_size()), str(len(r.missing(store))), updated)
            console.print(table if table.rows else f"no recordings in {folder}")
            return
        r = _recording(folder, name)
        table = Table("image", "digest", "platforms", "blobs", "size", title=f"recording {name} ({r.path})")
        for ref, image in sorted(r.images.items()):
            platforms = ", ".join(m.platform or "(single)" for m in image.manifests.values())
            blobs = image.blobs()
            table.add_row(ref, image.digest, platforms, str(len(blobs)), size(sum(blobs.values())))
        console.print(table)
        missing = r.missing(store)
        console.print(f"total {size(r.total_size())}; " + (f"{len(missing)} items missing from the cache:" if missing else "everything is in the cache"))
        for digest in missing:
            console.print(f"  {digest}")


@main.command("prune")
@cache_dir_option
@config_option
@click.option("--to", "target", metavar="SIZE", help="Evict least recently used blobs until the store is at most SIZE (e.g. 20GB).")
@click.option("--unused-days", type=click.IntRange(min=0), help="Drop blobs nobody pulled for this many days.")
@click.option("--all", "everything", is_flag=True, help="Drop every blob no recording refers to.")
def prune_command(
    cache_dir: Path | None, config_file: Path | None, target: str | None, unused_days: int | None, everything: bool
) -> None:
    """Free space: evict blobs by size or age. What a recording refers to is always kept, and tags
    whose content was evicted are forgotten, so they are fetched again rather than half-served.

    \b
    Examples:
      hubcache prune --to 20GB
      hubcache prune --unused-days 30
      hubcache prune --all
    """
    from .progress import count, size
    from .recording import RecordingError
    from .upkeep import parse_size, prune

    if not (target or unused_days is not None or everything):
        raise click.UsageError("say what to free: --to SIZE, --unused-days N or --all")
    try:
        limit = 0 if everything else parse_size(target) if target else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--to")
    with _store(cache_dir, config_file) as (store, folder):
        try:
            result = prune(store, folder, limit=limit, max_unused=unused_days * 86400.0 if unused_days is not None else None, in_use=0)
        except RecordingError as e:
            raise click.ClickException(f"nothing pruned: {e}")
    click.echo(
        f"freed {size(result.bytes)}: {count(result.blobs, 'blob')}, {count(result.manifests, 'manifest')}, "
        f"{count(result.tags, 'tag')}; {size(result.remaining)} of blobs remain"
    )


@main.command("verify")
@cache_dir_option
@config_option
def verify_command(cache_dir: Path | None, config_file: Path | None) -> None:
    """Re-hash every blob and manifest in the cache and drop those that do not match their digest
    (disk corruption, tampering). Exits 1 if anything was dropped.

    \b
    Examples:
      hubcache verify
      hubcache verify --cache-dir /var/cache/hubcache
    """
    from .progress import ByteBar, count, size
    from .upkeep import verify

    with _store(cache_dir, config_file) as (store, _):
        total = sum(b.size for b in store.blob_entries())
        with ByteBar("verifying", total) as bar:
            result = verify(store, bar.advance)
    click.echo(f"checked {count(result.checked, 'item')} ({size(result.bytes)}); {len(result.dropped)} dropped")
    for digest in result.dropped:
        click.echo(f"  dropped {digest}: its bytes do not match", err=True)
    if result.dropped:
        raise SystemExit(1)


def _options(
    cache_dir: Path | None, config_file: Path | None, confdir: Path, record: str | None, settings: tuple[str, ...]
) -> list[str]:
    """The `--set` list for the proxy: the config file, overridden by the command line."""
    named = [f"cache_dir={cache_dir}"] if cache_dir else []
    named += [f"record={record}"] if record else []
    explicit = {s.partition("=")[0] for s in [*named, *settings]}
    from_file = [s for s in _config_settings(config_file) if s.partition("=")[0] not in explicit]
    given = [*from_file, *named, *settings]
    default = [] if any(s.startswith("cache_dir=") for s in given) else ["cache_dir=cache"]
    return [f"confdir={confdir}", *default, *given]


def _make_ca(confdir: Path) -> Path:
    """Create mitmproxy's CA now, so that instructions and clients can name the file to trust."""
    from mitmproxy.certs import CertStore

    confdir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(str(confdir), "mitmproxy", 2048)
    return confdir.resolve() / CA_CERT


@contextmanager
def _store(cache_dir: Path | None, config_file: Path | None):
    """The content store of the cache folder the options name, for the offline subcommands."""
    from .store import Store

    folder = _cache_folder(cache_dir, config_file)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        store = Store(folder)
    except OSError as e:
        raise click.ClickException(f"cannot use the cache folder {folder}: {e.strerror or e}")
    try:
        yield store, folder
    finally:
        store.close()


def _cache_folder(cache_dir: Path | None, config_file: Path | None) -> Path:
    if cache_dir is None:
        named = [s for s in _config_settings(config_file) if s.startswith("cache_dir=")]
        cache_dir = Path(named[-1].partition("=")[2]) if named else Path("cache")
    return cache_dir.expanduser()


def _recording(folder: Path, name: str):
    from .recording import Recording, RecordingError

    try:
        path = Recording.open(folder, name).path
        if not path.exists():
            raise click.ClickException(f"no recording {name!r} in {folder}")
        return Recording.load(path)
    except RecordingError as e:
        raise click.ClickException(str(e))


def _image_reference(text: str):
    from .protocol import ImageReference

    try:
        return ImageReference.parse(text)
    except ValueError as e:
        raise click.ClickException(str(e))


def _mitmdump_with_hubcache(args: list[str]) -> None:
    """mitmdump with the addons built in rather than loaded as a script, so that a bad option
    value is refused by mitmproxy's own option handling: one line, no traceback."""
    from mitmproxy.tools import cmdline, dump
    from mitmproxy.tools.main import run as run_mitmproxy

    from .addons import make_addons

    class HubcacheMaster(dump.DumpMaster):
        def __init__(self, options, **kwargs):
            super().__init__(options, **kwargs)
            self.addons.add(*make_addons())

    run_mitmproxy(HubcacheMaster, cmdline.mitmdump, args)


def _config_settings(path: Path | None) -> list[str]:
    """The `--set NAME=VALUE` equivalents of a YAML configuration file."""
    if path is None:
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.ClickException(f"cannot read {path}: {e}")
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: expected a mapping of option: value")
    result = []
    for name, value in data.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool):
                item = str(item).lower()
            result.append(f"{name}={item}")
    return result


def instructions(host: str, port: int, ca_cert: Path) -> str:
    from . import clientsetup

    proxy = clientsetup.proxy_url(host, port)
    return f"""\
hubcache listens on {host}:{port}. Point dockerd at it:

  1. Trust its CA (for Docker Hub, dockerd ignores /etc/docker/certs.d; it uses the system pool):
       cp {ca_cert} {clientsetup.SYSTEM_CA} && update-ca-certificates
  2. Give dockerd the proxy, either as a systemd drop-in
       /etc/systemd/system/docker.service.d/http-proxy.conf:
         [Service]
         Environment="HTTPS_PROXY={proxy}"
     or (Engine 23+) in /etc/docker/daemon.json:
         {clientsetup.daemon_json_proxies(proxy)}
  3. systemctl daemon-reload && systemctl restart docker

skopeo and podman: HTTPS_PROXY={proxy} and the CA in {clientsetup.CONTAINERS_CERTS_DIR}/docker.io/.
Every file and command, per client (dockerd, containerd, podman, skopeo, systemd):
  hubcache setup CLIENT --proxy {proxy} --confdir {ca_cert.parent}
"""


# Operators' views of the cache and client set-up.

CLIENTS = ("dockerd", "containerd", "podman", "skopeo", "systemd")
DAY = 86400.0


@main.command("stats")
@cache_dir_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def stats_command(cache_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """Show what the cache holds: store size, blob, manifest and tag counts, recordings, misses
    in the journal (in total and in the last 24 hours), and the free space of the cache folder.

    \\b
    Examples:
      hubcache stats
      hubcache stats --json --cache-dir /var/cache/hubcache
    """
    import shutil

    from . import recording as rec
    from .progress import console, size

    with _existing_store(cache_dir, config_file) as (store, folder):
        summary = store.summary()
        data = {
            "cache_dir": str(folder.resolve()),
            "store_bytes": store.disk_usage(),
            "blobs": summary.blobs,
            "blob_bytes": summary.blob_bytes,
            "manifests": summary.manifests,
            "tags": summary.tags,
            "repositories": summary.repositories,
            "recordings": len(rec.names(folder)),
        }
    times = [_entry_time(e) for e in _journal(folder).entries()]
    since = time.time() - DAY
    data["misses"] = len(times)
    data["misses_24h"] = sum(1 for t in times if t is not None and t.timestamp() >= since)
    data["free_bytes"] = shutil.disk_usage(folder).free
    if as_json:
        click.echo(_json(data))
        return
    from rich.table import Table

    table = Table("", "", title=f"hubcache {data['cache_dir']}", show_header=False)
    table.add_row("store on disk", size(data["store_bytes"]))
    table.add_row("blobs", f"{data['blobs']} ({size(data['blob_bytes'])})")
    table.add_row("manifests", str(data["manifests"]))
    table.add_row("tags", f"{data['tags']} in {data['repositories']} repositories")
    table.add_row("recordings", str(data["recordings"]))
    table.add_row("misses", f"{data['misses']} ({data['misses_24h']} in the last 24 h)")
    table.add_row("free disk space", size(data["free_bytes"]))
    console.print(table)


@main.command("ls")
@cache_dir_option
@config_option
@click.argument("pattern", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (with every platform) instead of a table.")
def ls_command(cache_dir: Path | None, config_file: Path | None, pattern: str | None, as_json: bool) -> None:
    """List the cached images by registry, repository and tag: digest, platforms, the size of
    what the cache holds of them (configs and layers) and when it was last used. PATTERN
    (shell-style) matches registry/repository:tag or registry/repository.

    \\b
    Examples:
      hubcache ls
      hubcache ls 'docker.io/library/*'
      hubcache ls '*:3.20' --json
    """
    from fnmatch import fnmatchcase

    from .manifests import ManifestError
    from .progress import console, size
    from .recording import image_from_store

    images = []
    with _existing_store(cache_dir, config_file) as (store, folder):
        held = {b.digest: b for b in store.blob_entries()}
        for (registry, repository, tag), entry in sorted(store.tags()):
            name = f"{registry}/{repository}:{tag}"
            if pattern and not (fnmatchcase(name, pattern) or fnmatchcase(f"{registry}/{repository}", pattern)):
                continue
            try:
                image = image_from_store(store, registry, repository, tag)
            except ManifestError:
                image = None
            images.append(_listed_image(registry, repository, tag, entry.digest, image, held))
    if as_json:
        click.echo(_json(images))
        return
    if not images:
        click.echo(f"no images{f' match {pattern!r}' if pattern else ''} in {folder}")
        return
    from rich.table import Table

    table = Table("registry", "repository", "tag", "digest", "platforms", "size", "last use")
    for i in images:
        platforms = ", ".join(p["platform"] or "(single)" for p in i["platforms"]) or "(none cached)"
        shown = size(i["size"]) + ("" if i["complete"] else " (partial)")
        table.add_row(i["registry"], i["repository"], i["tag"], i["digest"][:19], platforms, shown, _local(i["last_used"]))
    console.print(table)


def _listed_image(registry: str, repository: str, tag: str, digest: str, image, held: dict) -> dict:
    """One row of `hubcache ls`: sizes count only the blobs the cache holds, each once."""
    platforms, sizes, used = [], {}, []
    for m in image.manifests.values() if image else []:
        present = [b for b in m.blobs if b.digest in held]
        sizes.update({b.digest: b.size for b in present})
        last = max((held[b.digest].used for b in present), default=None)
        used += [last] if last else []
        platforms.append(
            {
                "platform": m.platform,
                "digest": m.digest,
                "size": sum(b.size for b in present),
                "blobs": len(present),
                "missing_blobs": len(m.blobs) - len(present),
                "last_used": last,
            }
        )
    return {
        "registry": registry,
        "repository": repository,
        "tag": tag,
        "digest": digest,
        "media_type": image.media_type if image else None,
        "platforms": platforms,
        "size": sum(sizes.values()),
        "complete": image is not None and bool(platforms) and not any(p["missing_blobs"] for p in platforms),
        "last_used": max(used, default=None),
    }


@main.command("misses")
@cache_dir_option
@config_option
@click.option("--since", metavar="AGE|TIME", help="Only misses since an age ago (30m, 1h, 2d, 1w) or an ISO time (local unless it has an offset).")
@click.option("--registry", help="Only misses of this registry (docker.io for Docker Hub).")
@click.option("--repository", metavar="PATTERN", help="Only misses of repositories matching PATTERN (shell-style).")
@click.option("--kind", type=click.Choice(["blob", "manifest"]), help="Only blobs or only manifests.")
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Only the newest N (after the other filters).")
@click.option("--json", "as_json", is_flag=True, help="Print the journal's entries as a JSON list.")
def misses_command(
    cache_dir: Path | None,
    config_file: Path | None,
    since: str | None,
    registry: str | None,
    repository: str | None,
    kind: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """Show the miss journal: every request the cache could not answer from the store, and what
    happened (filled, passed, stale, rejected, failed, missing offline), newest last.

    \\b
    Examples:
      hubcache misses --since 1h
      hubcache misses --registry docker.io --repository 'library/*' --kind manifest
      hubcache misses --since 2026-05-01T08:00 --limit 20 --json
    """
    from datetime import datetime
    from fnmatch import fnmatchcase

    from .progress import console, size
    from .protocol import canonical_registry

    after = _parse_since(since, datetime.now().astimezone()) if since else None
    folder = _cache_folder(cache_dir, config_file)
    if not folder.is_dir():
        raise click.ClickException(_no_folder(folder))
    chosen = []
    for entry in _journal(folder).entries():
        when = _entry_time(entry)
        if after and (when is None or when < after):
            continue
        if registry and entry.get("registry") != canonical_registry(registry):
            continue
        if repository and not fnmatchcase(str(entry.get("repository")), repository):
            continue
        if kind and entry.get("kind") != kind:
            continue
        chosen.append(entry)
    chosen.sort(key=lambda e: _entry_time(e) or datetime.min.astimezone())
    if limit:
        chosen = chosen[-limit:]
    if as_json:
        click.echo(_json(chosen))
        return
    if not chosen:
        click.echo(f"no misses{' match' if since or registry or repository or kind else ''} in {folder / 'misses.jsonl'}")
        return
    from rich.table import Table

    table = Table("time", "kind", "image", "size", "outcome")
    for e in chosen:
        when = _entry_time(e)
        reference = str(e.get("reference") or "")
        sep = "@" if ":" in reference else ":"
        image = f"{e.get('registry')}/{e.get('repository')}{sep}{reference[:19] if sep == '@' else reference}"
        shown = size(e["bytes"]) if isinstance(e.get("bytes"), int) else ""
        table.add_row(_local(when.timestamp(), "%Y-%m-%d %H:%M:%S") if when else "?", str(e.get("kind") or ""), image, shown, str(e.get("outcome")))
    console.print(table)


@main.command("ca")
@click.option(
    "--confdir",
    default="certs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="mitmproxy's confdir, as given to `hubcache run`: the CA is generated here if absent.",
)
@click.option("--install", is_flag=True, help="Add the CA to this machine's trust store (/usr/local/share/ca-certificates/hubcache.crt).")
def ca_command(confdir: Path, install: bool) -> None:
    """Print the CA certificate clients must trust: its path (on stderr) and its PEM (on
    stdout). The CA is generated first if the confdir has none, as `hubcache run` does.

    \\b
    Examples:
      hubcache ca
      hubcache ca --confdir /etc/hubcache > hubcache.crt
      hubcache ca --install          # as root, on Debian or Ubuntu
    """
    import shutil
    import subprocess

    from .clientsetup import SYSTEM_CA

    ca_cert = _ca(confdir)
    click.echo(ca_cert, err=True)
    click.echo(ca_cert.read_text(), nl=False)
    if not install:
        return
    tool = shutil.which("update-ca-certificates")
    if tool is None:
        raise click.ClickException(
            f"update-ca-certificates not found: add {ca_cert} to this system's trust store yourself "
            "(Fedora, RHEL: copy it to /etc/pki/ca-trust/source/anchors/ and run update-ca-trust)"
        )
    target = SYSTEM_CA
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca_cert, target)
    except OSError as e:
        raise click.ClickException(f"cannot write {target}: {e.strerror or e} (run as root)")
    done = subprocess.run([tool], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise click.ClickException(f"update-ca-certificates failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    click.echo(f"installed {target} into the system trust store; restart the daemons that read it (dockerd, containerd)", err=True)


@main.command("options")
@click.option("--markdown", is_flag=True, help="Print the table the README carries.")
def options_command(markdown: bool) -> None:
    """List every hubcache option: name, type, default and meaning. Set them with
    `hubcache run --set NAME=VALUE`, `mitmdump --set NAME=VALUE` or in a --config file.

    \b
    Examples:
      hubcache options
      hubcache options --markdown > options.md
    """
    from rich.markup import escape
    from rich.table import Table

    from . import reference
    from .progress import console

    if markdown:
        click.echo(reference.markdown())
        return
    table = Table("option", "type", "default", "meaning", show_lines=True)
    for option in reference.options():
        table.add_row(*(escape(cell) for cell in (option.name, option.type, option.default, option.help)))
    console.print(table)


@main.command("setup")
@click.argument("client", type=click.Choice(CLIENTS))
@click.option("--proxy", metavar="URL", help="The proxy URL clients use  [default: from --listen-host/--listen-port]")
@click.option("--listen-host", help="hubcache's --listen-host, if not the config file's or 127.0.0.1.")
@click.option("--listen-port", type=int, help="hubcache's --listen-port, if not the config file's or 3128.")
@click.option(
    "--confdir",
    default="certs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="mitmproxy's confdir, as given to `hubcache run`: the CA is generated here if absent.",
)
@config_option
def setup_command(
    client: str, proxy: str | None, listen_host: str | None, listen_port: int | None, confdir: Path, config_file: Path | None
) -> None:
    """Print how to point CLIENT at this hubcache: every file to write, the environment and the
    commands, as a shell script to read (and run as root). For `systemd`: a unit file that runs
    hubcache as a service.

    \\b
    Examples:
      hubcache setup dockerd
      hubcache setup containerd --config /etc/hubcache/hubcache.yaml
      hubcache setup skopeo --proxy http://cache.example.internal:3128 --confdir /etc/hubcache
      hubcache setup systemd --listen-port 3128 > hubcache-setup.sh
    """
    import sys
    from urllib.parse import urlsplit

    from . import clientsetup
    from .registries import DEFAULT_REGISTRIES

    configured: dict[str, list[str]] = {}
    for setting in _config_settings(config_file):
        name, _, value = setting.partition("=")
        configured.setdefault(name, []).append(value)
    host = listen_host or configured.get("listen_host", ["127.0.0.1"])[-1]
    try:
        port = listen_port or int(configured.get("listen_port", ["3128"])[-1])
    except ValueError:
        raise click.ClickException(f"{config_file}: listen_port is not a number")
    if client == "systemd":
        executable = Path(sys.executable).with_name("hubcache")
        click.echo(clientsetup.systemd(executable, host, port).text(), nl=False)
        return
    if proxy:
        parts = urlsplit(proxy)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(f"{proxy!r} is not a proxy URL like http://127.0.0.1:3128", param_hint="--proxy")
    else:
        proxy = clientsetup.proxy_url(host, port)
    ca_cert = _ca(confdir)
    registries = configured.get("registries") or list(DEFAULT_REGISTRIES)
    setups = {
        "dockerd": lambda: clientsetup.dockerd(proxy, ca_cert),
        "containerd": lambda: clientsetup.containerd(proxy, ca_cert, registries),
        "podman": lambda: clientsetup.podman(proxy, ca_cert),
        "skopeo": lambda: clientsetup.skopeo(proxy, ca_cert),
    }
    click.echo(setups[client]().text(), nl=False)


@contextmanager
def _existing_store(cache_dir: Path | None, config_file: Path | None):
    """The store of a cache folder that must exist already: views never create one."""
    folder = _cache_folder(cache_dir, config_file)
    if not folder.is_dir():
        raise click.ClickException(_no_folder(folder))
    with _store(folder, None) as opened:
        yield opened


def _no_folder(folder: Path) -> str:
    return f"no cache folder at {folder} (give --cache-dir, $HUBCACHE_CACHE_DIR or a --config with cache_dir)"


def _ca(confdir: Path) -> Path:
    try:
        return _make_ca(confdir)
    except OSError as e:
        raise click.ClickException(f"cannot create the CA in {confdir}: {e.strerror or e}")


def _journal(folder: Path):
    from .journal import MissJournal

    return MissJournal(folder / "misses.jsonl")


def _entry_time(entry: dict):
    from datetime import datetime

    try:
        return datetime.fromisoformat(entry["time"])
    except (KeyError, TypeError, ValueError):
        return None


def _parse_since(text: str, now):
    """An age (`90s`, `30m`, `1h`, `2d`, `1w`) back from `now`, or an ISO time."""
    import re
    from datetime import datetime, timedelta

    age = re.fullmatch(r"(\d+)\s*([smhdw])", text.strip())
    if age:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[age[2]]
        return now - timedelta(**{unit: int(age[1])})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an age like 1h or 2d nor an ISO time like 2026-05-01T08:00", param_hint="--since")
    return when if when.tzinfo else when.astimezone()


def _local(timestamp: float | None, form: str = "%Y-%m-%d %H:%M") -> str:
    return time.strftime(form, time.localtime(timestamp)) if timestamp else "-"


def _json(data) -> str:
    import json

    return json.dumps(data, indent=2)
