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

    if cache_dir is None:
        named = [s for s in _config_settings(config_file) if s.startswith("cache_dir=")]
        cache_dir = Path(named[-1].partition("=")[2]) if named else Path("cache")
    folder = cache_dir.expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        store = Store(folder)
    except OSError as e:
        raise click.ClickException(f"cannot use the cache folder {folder}: {e.strerror or e}")
    try:
        yield store, folder
    finally:
        store.close()


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

    from .hubcache import make_addons

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
    proxy_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    proxy = f"http://{proxy_host}:{port}"
    return f"""\
hubcache listens on {host}:{port}. Point dockerd at it:

  1. Trust its CA (for Docker Hub, dockerd ignores /etc/docker/certs.d; it uses the system pool):
       cp {ca_cert} /usr/local/share/ca-certificates/hubcache.crt && update-ca-certificates
  2. Give dockerd the proxy, either as a systemd drop-in
       /etc/systemd/system/docker.service.d/http-proxy.conf:
         [Service]
         Environment="HTTPS_PROXY={proxy}"
     or (Engine 23+) in /etc/docker/daemon.json:
         {{"proxies": {{"https-proxy": "{proxy}"}}}}
  3. systemctl daemon-reload && systemctl restart docker

skopeo and podman: HTTPS_PROXY={proxy} and the CA in /etc/containers/certs.d/docker.io/.
"""
