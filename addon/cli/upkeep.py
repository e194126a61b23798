"""Keeping the store in shape from the command line: `hubcache prune` (free space now) and
`hubcache verify` (re-hash everything, drop what does not match). The work is `upkeep`'s."""

from __future__ import annotations

from pathlib import Path

import click

from .config import cache_dir_option, config_option, open_store


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
    from ..progress import count, size
    from ..recording import RecordingError
    from ..upkeep import parse_size, prune

    if not (target or unused_days is not None or everything):
        raise click.UsageError("say what to free: --to SIZE, --unused-days N or --all")
    try:
        limit = 0 if everything else parse_size(target) if target else None
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--to") from e
    with open_store(cache_dir, config_file) as (store, folder):
        try:
            result = prune(store, folder, limit=limit, max_unused=unused_days * 86400.0 if unused_days is not None else None, in_use=0)
        except RecordingError as e:
            raise click.ClickException(f"nothing pruned: {e}") from e
    click.echo(
        f"freed {size(result.bytes)}: {count(result.blobs, 'blob')}, {count(result.manifests, 'manifest')}, "
        f"{count(result.tags, 'tag')}; {size(result.remaining)} of blobs remain"
    )


@click.command("verify")
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
    from ..progress import ByteBar, count, size
    from ..upkeep import verify

    with open_store(cache_dir, config_file) as (store, _):
        total = sum(b.size for b in store.blob_entries())
        with ByteBar("verifying", total) as bar:
            result = verify(store, bar.advance)
    click.echo(f"checked {count(result.checked, 'item')} ({size(result.bytes)}); {len(result.dropped)} dropped")
    for digest in result.dropped:
        click.echo(f"  dropped {digest}: its bytes do not match", err=True)
    if result.dropped:
        raise SystemExit(1)
