"""Keeping the store in shape from the command line: `hubcache prune` (free space now), `hubcache
rm` (remove images), and `hubcache verify` (re-hash everything, drop what does not match). The work
is `storage.eviction`'s."""

from __future__ import annotations

from pathlib import Path

import click

from .config import cache_dir_option, config_option, existing_store, open_store


@click.command("prune")
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
    from ..storage.eviction import parse_size, prune
    from ..storage.recordings import RecordingError
    from ..units import DAY
    from .progress import count, size

    if not (target or unused_days is not None or everything):
        raise click.UsageError("say what to free: --to SIZE, --unused-days N or --all")
    try:
        limit = 0 if everything else parse_size(target) if target else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--to") from e
    with open_store(cache_dir, config_file) as (store, folder):
        try:
            result = prune(store, folder, limit=limit, max_unused=unused_days * DAY if unused_days is not None else None, in_use=0)
        except RecordingError as e:
            raise click.ClickException(f"nothing pruned: {e}") from e
    click.echo(
        f"freed {size(result.bytes)}: {count(result.blobs, 'blob')}, {count(result.manifests, 'manifest')}, "
        f"{count(result.tags, 'tag')}; {size(result.remaining)} of blobs remain"
    )


@click.command("rm")
@cache_dir_option
@config_option
@click.option("--dry-run", is_flag=True, help="Show what would go, remove nothing.")
@click.argument("images", nargs=-1, required=True)
def rm_command(cache_dir: Path | None, config_file: Path | None, dry_run: bool, images: tuple[str, ...]) -> None:
    """Remove images from the cache: the tag (or, for a digest, every tag naming it), the manifests
    no other tag or recording needs, and the blobs no remaining manifest uses. Safe while the proxy
    runs: transfers under way keep their bytes, and the next pull fills the image again. Exits 1
    if an image named is not in the cache.

    \b
    Examples:
      hubcache rm alpine:3.20 ghcr.io/acme/app:1
      hubcache rm --dry-run docker.io/library/nginx@sha256:0123...
    """
    from ..registry.protocol import ImageReference
    from ..storage.eviction import remove
    from ..storage.recordings import RecordingError
    from .progress import count, size

    try:
        references = [ImageReference.parse(text) for text in images]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="IMAGES") from e
    with existing_store(cache_dir, config_file) as (store, folder):
        try:
            result = remove(store, folder, references, dry_run=dry_run)
        except RecordingError as e:
            raise click.ClickException(f"nothing removed: {e}") from e
    verb = "would remove" if dry_run else "removed"
    click.echo(
        f"{verb} {count(len(result.tags), 'tag')}, {count(len(result.manifests), 'manifest')}, "
        f"{count(len(result.blobs), 'blob')} ({size(result.bytes)})"
    )
    for tag in result.tags:
        click.echo(f"  tag {tag}")
    for digest in result.manifests:
        click.echo(f"  manifest {digest}")
    for digest in result.blobs:
        click.echo(f"  blob {digest}")
    for digest in result.kept:
        click.echo(f"  kept manifest {digest}: another tag or a recording needs it")
    for image in result.missing:
        click.echo(f"hubcache rm: {image} is not in the cache", err=True)
    if result.missing:
        raise SystemExit(1)


@click.command("verify")
@cache_dir_option
@config_option
def verify_command(cache_dir: Path | None, config_file: Path | None) -> None:
    """Re-hash every blob and manifest in the cache and drop those that do not match their digest
    (disk corruption, tampering), each with the manifests naming it and the tags leading to them,
    so every tag left still pulls. Also removes the files a crash left that no entry names.
    Exits 1 if anything was dropped.

    \b
    Examples:
      hubcache verify
      hubcache verify --cache-dir /var/cache/hubcache
    """
    from ..storage.eviction import verify
    from .progress import ByteBar, count, size

    with open_store(cache_dir, config_file) as (store, _):
        total = store.summary().blob_bytes
        with ByteBar("verifying", total) as bar:
            result = verify(store, bar.advance)
    taken = f" with {count(result.manifests, 'manifest')} and {count(result.tags, 'tag')} naming them" if result.manifests or result.tags else ""
    click.echo(f"checked {count(result.checked, 'item')} ({size(result.bytes)}); {len(result.dropped)} dropped{taken}")
    if result.strays:
        click.echo(f"removed {count(result.strays, 'file')} that no entry named (left by a crash)")
    for digest in result.dropped:
        click.echo(f"  dropped {digest}: its bytes do not match", err=True)
    if result.dropped:
        raise SystemExit(1)
