"""Operators' views of the cache: `hubcache stats` (what it holds), `hubcache ls` (the cached
images), `hubcache misses` (the miss journal) and `hubcache watch` (the watched images). They only
read, and never create a cache folder; each prints a rich table, or JSON with --json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..units import DAY
from .config import cache_dir_option, cache_folder, config_option, existing_store, no_folder

LS_PAGE = 100  # images `hubcache ls` lists unless told

if TYPE_CHECKING:
    from datetime import datetime

    from ..storage.journal import MissJournal
    from ..storage.recordings import Image



@click.command("stats")
@cache_dir_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def stats_command(cache_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """Show what the cache holds: store size, blob, manifest and tag counts, recordings, misses
    in the journal (in total and in the last 24 hours), and the free space of the cache folder.

    \b
    Examples:
      hubcache stats
      hubcache stats --json --cache-dir /var/cache/hubcache
    """
    import shutil

    from ..storage import recordings as rec
    from .progress import console, size

    with existing_store(cache_dir, config_file) as (store, folder):
        summary = store.summary()
        data: dict[str, Any] = {  # a JSON object: text and counts
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


@click.command("ls")
@cache_dir_option
@config_option
@click.argument("pattern", required=False)
@click.option("--registry", help="Only images of this registry (docker.io for Docker Hub).")
@click.option("--limit", type=click.IntRange(min=1), default=LS_PAGE, show_default=True, help="List at most N images (one page).")
@click.option("--after", metavar="REGISTRY/REPOSITORY:TAG", help="Start after this image (the next page).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (with every platform) instead of a table.")
def ls_command(
    cache_dir: Path | None,
    config_file: Path | None,
    pattern: str | None,
    registry: str | None,
    limit: int,
    after: str | None,
    as_json: bool,
) -> None:
    """List the cached images by registry, repository and tag, a page at a time: digest, platforms,
    how many referrers (signatures, SBOMs, attestations) are cached with them, the size of what the
    cache holds of them (configs and layers) and when it was last used. PATTERN (shell-style)
    matches registry/repository:tag or registry/repository. When there are more, the last line
    (on stderr) says how to list the next page.

    \b
    Examples:
      hubcache ls
      hubcache ls 'docker.io/library/*'
      hubcache ls --registry ghcr.io --limit 20
      hubcache ls --after docker.io/library/alpine:3.20
      hubcache ls '*:3.20' --json
    """
    from fnmatch import fnmatchcase

    from ..registry.manifests import ManifestError
    from ..registry.protocol import canonical_registry
    from ..storage.recordings import image_from_store
    from .progress import console, size

    def matches(registry: str, repository: str, tag: str) -> bool:
        return not pattern or fnmatchcase(f"{registry}/{repository}:{tag}", pattern) or fnmatchcase(f"{registry}/{repository}", pattern)

    start = _image_name(after) if after else None
    images = []
    with existing_store(cache_dir, config_file) as (store, folder):
        page = store.tag_page(start, limit + 1, canonical_registry(registry) if registry else None, matches)
        for (registry_, repository, tag), entry in page[:limit]:
            try:
                image = image_from_store(store, registry_, repository, tag)
            except ManifestError:
                image = None
            blobs = {b.digest for m in image.manifests.values() for b in m.blobs} if image else set()
            held = {d: e for d in blobs if (e := store.blob_entry(d))}
            images.append(_listed_image(registry_, repository, tag, entry.digest, image, held))
    last = images[-1] if len(page) > limit else None
    more = f"more images: hubcache ls --after {last['registry']}/{last['repository']}:{last['tag']}" if last else ""
    if as_json:
        click.echo(_json(images))
        if more:
            click.echo(more, err=True)
        return
    if not images:
        click.echo(f"no images{f' match {pattern!r}' if pattern or registry or after else ''} in {folder}")
        return
    from rich.table import Table

    table = Table("registry", "repository", "tag", "digest", "platforms", "referrers", "size", "last use")
    for i in images:
        platforms = ", ".join(p["platform"] or "(single)" for p in i["platforms"]) or "(none cached)"
        shown = size(i["size"]) + ("" if i["complete"] else " (partial)")
        table.add_row(
            i["registry"], i["repository"], i["tag"], i["digest"][:19], platforms, str(i["referrers"]), shown, _local(i["last_used"])
        )
    console.print(table)
    if more:
        click.echo(more, err=True)


def _image_name(text: str) -> tuple[str, str, str]:
    """registry/repository:tag as (registry, repository, tag), for --after."""
    name, colon, tag = text.rpartition(":")
    registry, slash, repository = name.partition("/")
    if not (colon and slash and repository and "/" not in tag):
        raise click.BadParameter(f"{text!r} is not registry/repository:tag, as hubcache ls shows it", param_hint="--after")
    return registry, repository, tag


def _listed_image(registry: str, repository: str, tag: str, digest: str, image: Image | None, held: dict) -> dict:
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
        "referrers": len(image.referrers) if image else 0,  # signatures, SBOMs, attestations cached with it
        "size": sum(sizes.values()),
        "complete": image is not None and bool(platforms) and not any(p["missing_blobs"] for p in platforms),
        "last_used": max(used, default=None),
    }


@click.command("misses")
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

    \b
    Examples:
      hubcache misses --since 1h
      hubcache misses --registry docker.io --repository 'library/*' --kind manifest
      hubcache misses --since 2026-05-01T08:00 --limit 20 --json
    """
    from datetime import datetime
    from fnmatch import fnmatchcase

    from ..registry.protocol import canonical_registry
    from .progress import console, size

    after = _parse_since(since, datetime.now().astimezone()) if since else None
    folder = cache_folder(cache_dir, config_file)
    if not folder.is_dir():
        raise click.ClickException(no_folder(folder))
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

    from ..storage.journal import outcome_text

    table = Table("time", "kind", "image", "size", "outcome")
    for e in chosen:
        when = _entry_time(e)
        reference = str(e.get("reference") or "")
        sep = "@" if ":" in reference else ":"
        image = f"{e.get('registry')}/{e.get('repository')}{sep}{reference[:19] if sep == '@' else reference}"
        shown = size(e["bytes"]) if isinstance(e.get("bytes"), int) else ""
        table.add_row(_local(when.timestamp(), "%Y-%m-%d %H:%M:%S") if when else "?", str(e.get("kind") or ""), image, shown, outcome_text(e))
    console.print(table)


@click.command("watch")
@cache_dir_option
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the watched tags as a JSON list.")
def watch_command(cache_dir: Path | None, config_file: Path | None, as_json: bool) -> None:
    """Show the watched images (option `watch`) as the proxy's last round left them: each tag's
    digest upstream, when it was last checked and last changed, and its state.

    \b
    Examples:
      hubcache watch
      hubcache watch --config /etc/hubcache/config.yaml --json
    """
    from ..prefetch.watch import STATE_FILE, read_state
    from .progress import console

    folder = cache_folder(cache_dir, config_file)
    if not folder.is_dir():
        raise click.ClickException(no_folder(folder))
    try:
        state = read_state(folder)
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot read {folder / STATE_FILE}: {e}") from e
    tags = state.get("tags", []) if state else []
    if as_json:
        click.echo(_json(tags))
        return
    if not tags:
        click.echo(f"nothing watched yet in {folder} (option watch; a running proxy writes {STATE_FILE} after each round)")
        return
    from rich.table import Table

    table = Table("image", "digest", "last check", "last change", "state")
    for t in tags:
        checked, changed = t.get("checked") or 0, t.get("changed") or 0
        table.add_row(
            str(t.get("image")),
            str(t.get("digest") or "-")[:19],
            _local(checked, "%Y-%m-%d %H:%M:%S") if checked else "-",
            _local(changed, "%Y-%m-%d %H:%M:%S") if changed else "-",
            str(t.get("state")),
        )
    console.print(table)


def _journal(folder: Path) -> MissJournal:
    from ..storage.journal import MissJournal

    return MissJournal(folder / "misses.jsonl")


def _entry_time(entry: dict) -> datetime | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(entry["time"])
    except (KeyError, TypeError, ValueError):
        return None


def _parse_since(text: str, now: datetime) -> datetime:
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
        raise click.BadParameter(f"{text!r} is neither an age like 1h or 2d nor an ISO time like 2026-05-01T08:00", param_hint="--since") from None
    return when if when.tzinfo else when.astimezone()


def _local(timestamp: float | None, form: str = "%Y-%m-%d %H:%M") -> str:
    return time.strftime(form, time.localtime(timestamp)) if timestamp else "-"


def _json(data: object) -> str:
    import json

    return json.dumps(data, indent=2)
