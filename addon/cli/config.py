"""The options every command shares and what they name: --cache-dir ($HUBCACHE_CACHE_DIR), the
--config file ($HUBCACHE_CONFIG), and the cache folder and store they lead to.

The cache folder is --cache-dir, else $HUBCACHE_CACHE_DIR, else the `cache_dir` of the --config
file, else ./cache. Every failure here is a `click.ClickException`: one line, exit status 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

if TYPE_CHECKING:
    from ..storage.store import Store


def cache_dir_option[F: Callable[..., Any]](command: F) -> F:
    return click.option(
        "--cache-dir",
        envvar="HUBCACHE_CACHE_DIR",
        type=click.Path(file_okay=False, path_type=Path),
        help="Folder of the content store, the recordings and the miss journal  [default: cache]",
    )(command)


def config_option[F: Callable[..., Any]](command: F) -> F:
    return click.option(
        "--config",
        "config_file",
        envvar="HUBCACHE_CONFIG",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        help="YAML file of option: value pairs (any mitmproxy or hubcache option); the command line wins.",
    )(command)


def config_settings(path: Path | None) -> list[str]:
    """The `--set NAME=VALUE` equivalents of a YAML configuration file."""
    if path is None:
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise click.ClickException(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise click.ClickException(f"{path}: expected a mapping of option: value")
    result = []
    for name, value in data.items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool):
                item = str(item).lower()
            result.append(f"{name}={item}")
    return result


def cache_folder(cache_dir: Path | None, config_file: Path | None) -> Path:
    if cache_dir is None:
        named = [s for s in config_settings(config_file) if s.startswith("cache_dir=")]
        cache_dir = Path(named[-1].partition("=")[2]) if named else Path("cache")
    return cache_dir.expanduser()


@contextmanager
def open_store(cache_dir: Path | None, config_file: Path | None) -> Iterator[tuple[Store, Path]]:
    """The content store of the cache folder the options name (created if absent), and the folder."""
    from ..storage.store import Store

    folder = cache_folder(cache_dir, config_file)
    try:
        store = Store(folder)  # makes the folder, private
    except OSError as e:
        raise click.ClickException(f"cannot use the cache folder {folder}: {e.strerror or e}") from e
    try:
        yield store, folder
    finally:
        store.close()


@contextmanager
def existing_store(cache_dir: Path | None, config_file: Path | None) -> Iterator[tuple[Store, Path]]:
    """The store of a cache folder that must exist already: views never create one."""
    folder = cache_folder(cache_dir, config_file)
    if not folder.is_dir():
        raise click.ClickException(no_folder(folder))
    with open_store(folder, None) as opened:
        yield opened


def no_folder(folder: Path) -> str:
    return f"no cache folder at {folder} (give --cache-dir, $HUBCACHE_CACHE_DIR or a --config with cache_dir)"
