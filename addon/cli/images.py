"""Moving images into and out of the cache: `hubcache prefetch` (from upstream, through a proxy
run in this process), `hubcache export` and `hubcache import` (one OCI archive carried to another
cache), and `hubcache recordings` (the named sets of images that are carried)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .ca import make_ca
from .config import cache_dir_option, config_option, open_store
from .proxy import key_size, proxy_options, proxy_settings

SHOWN = 5  # images named in the summaries of import and prefetch, unless --verbose

if TYPE_CHECKING:
    from rich.table import Table

    from ..prefetch.client import Result
    from ..registry.protocol import ImageReference
    from ..storage.recordings import Recording


@click.command()
@proxy_options
@click.argument("images", nargs=-1, required=True)
@click.option(
    "--platform",
    "platforms",
    multiple=True,
    metavar="OS/ARCH[/VARIANT]",
    help="Only these platforms of a multi-platform image (repeatable)  [default: every platform]",
)
@click.option(
    "--creds",
    multiple=True,
    metavar="[REGISTRY=]@FILE|env:NAME",
    help="A login, USER:SECRET read from a file or an environment variable (never inline); "
    "name the REGISTRY when the images are on several (repeatable)  [default: the engines' logins]",
)
@click.option(
    "--authfile",
    type=click.Path(dir_okay=False, path_type=Path),
    help="podman/skopeo's auth.json to read logins from  [default: $XDG_RUNTIME_DIR/containers/auth.json, "
    "~/.config/containers/auth.json, then ~/.docker/config.json]",
)
@click.option(
    "--no-referrers",
    is_flag=True,
    help="Skip the images' signatures, SBOMs and attestations (referrers API, else the tags sha256-<hex>.sig|.att|.sbom)",
)
@click.option("--verbose", "-v", is_flag=True, help=f"A row for every image (else the first {SHOWN} and every failure).")
def prefetch(
    cache_dir: Path | None,
    config_file: Path | None,
    confdir: Path,
    record: str | None,
    settings: tuple[str, ...],
    images: tuple[str, ...],
    platforms: tuple[str, ...],
    creds: tuple[str, ...],
    authfile: Path | None,
    no_referrers: bool,
    verbose: bool,
) -> None:
    """Fill the cache with IMAGES from upstream, without any container engine.

    hubcache runs inside this command and the images are pulled through it, so all of its options
    (registries, upstream_map, upstream proxy, trusted CAs) apply. Prepare an air-gapped site with
    --record, then `hubcache export --recording NAME`.

    Private images need a login: --creds, or the one `docker login` or `podman login` kept. It is
    presented only to the registry's token service (or to the registry, when it asks for Basic).

    \b
    Examples:
      hubcache prefetch alpine:3.20 nginx
      hubcache prefetch --platform linux/amd64 --platform linux/arm64 ghcr.io/org/app:1.4
      hubcache prefetch --record lab python:3.12-slim postgres:16
      hubcache prefetch --creds @~/.ghcr-token ghcr.io/org/private:2
    """
    from ..prefetch import client as pf
    from ..prefetch import logins as lg
    from ..registry.protocol import ImageReference
    from .local_proxy import LocalProxy
    from .progress import LayerBars, console

    parsed = []  # an image that does not parse is reported in the results
    for text in images:
        with contextlib.suppress(ValueError):
            parsed.append(ImageReference.parse(text))
    try:
        logins = lg.load(list(creds), parsed, authfile)
    except lg.LoginError as e:
        raise click.ClickException(str(e)) from e
    for note in dict.fromkeys(filter(None, map(logins.unsupported, parsed))):
        click.echo(f"Warning: {note}", err=True)
    # What the operator names is pinned in the recording: eviction never drops it.
    options = [*proxy_settings(cache_dir, config_file, confdir, record, settings), "record_pins=true"]
    ca_cert = make_ca(confdir, key_size(options))
    results = []
    try:
        with LocalProxy(options) as proxy, LayerBars() as bars:
            if proxy.options.offline:
                raise click.ClickException("prefetch fetches from upstream; it cannot run with offline=true")
            client = pf.RegistryClient(proxy.url, ca_cert, logins=logins)
            for image in images:
                results.append(pf.prefetch(proxy, client, image, list(platforms), bars, referrers=not no_referrers))
    except click.ClickException:
        raise
    except Exception as e:  # mitmproxy's OptionsError, or a proxy that could not start
        raise click.ClickException(str(e)) from e
    failed = [r for r in results if r.error]
    shown = _prefetch_rows(results, verbose)
    console.print(_prefetch_table(shown))
    click.echo(_prefetch_summary(results, len(results) - len(shown)))
    for r in failed:
        click.echo(f"Error: {r.error}", err=True)
    if failed:
        raise SystemExit(1)


def _prefetch_rows(results: list[Result], verbose: bool) -> list[Result]:
    """The rows of the table: every image with --verbose, else the first few and every failure."""
    return results if verbose else [r for i, r in enumerate(results) if i < SHOWN or r.error]


def _prefetch_summary(results: list[Result], hidden: int) -> str:
    from .progress import count, size

    done = [r for r in results if not r.error]
    summary = (
        f"prefetched {count(len(done), 'image')}: {count(sum(r.fetched for r in done), 'blob')} fetched "
        f"({size(sum(r.fetched_bytes for r in done))}), {count(sum(r.held for r in done), 'blob')} already cached"
    )
    summary += f"; {len(results) - len(done)} failed" if len(done) < len(results) else ""
    return summary + (f"; {hidden} more rows with --verbose" if hidden else "")


def _prefetch_table(results: list[Result]) -> Table:
    from rich.table import Table

    from .progress import size

    table = Table("image", "digest", "platforms", "referrers", "fetched", "already cached", title="prefetch")
    for r in results:
        if r.error:
            table.add_row(r.image, "[red]failed[/red]", "", "", "", "")
        else:
            fetched = f"{r.fetched} blobs, {size(r.fetched_bytes)}"
            table.add_row(r.image, r.digest[:19], ", ".join(r.platforms), str(r.referrers), fetched, f"{r.held} blobs")
    return table


@click.command("export")
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
    from ..storage.bundle import BundleError, export
    from ..storage.recordings import image_from_store
    from .progress import ByteBar, count, size

    if bool(images) == bool(recording):
        raise click.UsageError("give either IMAGES or --recording NAME")
    with open_store(cache_dir, config_file) as (store, folder):
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
            raise click.ClickException(str(e)) from e
        except OSError as e:
            raise click.ClickException(f"cannot write {output}: {e.strerror or e}") from e
    click.echo(
        f"{output}: {count(len(summary.images), 'image')}, {count(summary.manifests, 'manifest')}, "
        f"{count(summary.blobs, 'blob')} ({size(summary.bytes)})"
    )


@click.command("import")
@cache_dir_option
@config_option
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--verbose", "-v", is_flag=True, help=f"Name every image imported (else the first {SHOWN}).")
def import_command(cache_dir: Path | None, config_file: Path | None, bundle: Path, verbose: bool) -> None:
    """Load a bundle written by `hubcache export` (or any OCI archive whose entries are named
    registry/repository:tag) into the cache, verifying every digest first.

    Nothing is stored unless all of it verifies: a corrupt or truncated file is refused and leaves
    the cache as it was. So is a file whose blobs would not fit in the cache folder's free space
    (refused before any is read), or that carries a blob its manifests do not name or with another
    size. A recording carried in the bundle is created in the cache as well.

    \b
    Examples:
      hubcache import lab.tar
      hubcache import --cache-dir /var/cache/hubcache lab.tar
    """
    from ..storage.bundle import BundleError, PartlyImported, import_bundle
    from .progress import ByteBar, count, size

    with open_store(cache_dir, config_file) as (store, folder):
        try:
            with ByteBar(f"verifying {bundle.name}", bundle.stat().st_size) as bar:
                summary = import_bundle(store, bundle, folder, bar.advance)
        except BundleError as e:
            raise click.ClickException(f"{e}; the cache is unchanged") from e
        except PartlyImported as e:
            raise click.ClickException(f"cannot import into {folder}: {e} (import the file again once fixed)") from e
        except OSError as e:
            raise click.ClickException(f"cannot import into {folder}: {e.strerror or e}; the cache is unchanged") from e
    click.echo(
        f"imported {count(len(summary.images), 'image')}: "
        f"{count(summary.manifests, 'manifest')}, {count(summary.blobs, 'new blob')} ({size(summary.bytes)}), "
        f"{summary.already_held} already held"
    )
    shown = summary.images if verbose else summary.images[:SHOWN]
    for name in shown:
        click.echo(f"  {name}")
    if len(shown) < len(summary.images):
        click.echo(f"  and {len(summary.images) - len(shown)} more (--verbose names them all)")


@click.command()
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

    from ..storage import recordings as rec
    from .progress import console, size

    with open_store(cache_dir, config_file) as (store, folder):
        if name is None:
            table = Table("recording", "images", "size", "missing from the cache", "updated")
            for each in rec.names(folder):
                r = _recording(folder, each)
                updated = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.path.stat().st_mtime))
                table.add_row(each, str(len(r.images)), size(r.total_size()), str(len(r.missing(store))), updated)
            console.print(table if table.rows else f"no recordings in {folder}")
            return
        r = _recording(folder, name)
        table = Table("image", "digest", "platforms", "referrers", "blobs", "size", "pinned", title=f"recording {name} ({r.path})")
        for ref, image in sorted(r.images.items()):
            platforms = ", ".join(m.platform or "(single)" for m in image.manifests.values())
            blobs = image.blobs()
            pinned = "yes" if image.pinned else "no"
            table.add_row(ref, image.digest, platforms, str(len(image.referrers)), str(len(blobs)), size(sum(blobs.values())), pinned)
        console.print(table)
        missing = r.missing(store)
        state = f"{len(missing)} items missing from the cache:" if missing else "everything is in the cache"
        console.print(f"total {size(r.total_size())}; {state}")
        for digest in missing:
            console.print(f"  {digest}")


def _recording(folder: Path, name: str) -> Recording:
    from ..storage.recordings import Recording, RecordingError

    try:
        path = Recording.open(folder, name).path
        if not path.exists():
            raise click.ClickException(f"no recording {name!r} in {folder}")
        return Recording.load(path)
    except RecordingError as e:
        raise click.ClickException(str(e)) from e


def _image_reference(text: str) -> ImageReference:
    from ..registry.protocol import ImageReference

    try:
        return ImageReference.parse(text)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
