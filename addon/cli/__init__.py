"""The `hubcache` command line (click; tables and bars with rich): one module per group of commands,
each registered here (docs/architecture.md lists them). Commands import the rest of hubcache only
when they run, so `--help` stays quick; errors are `click.ClickException`s: one line on stderr and a
non-zero exit status."""

from __future__ import annotations

import click

from . import clients, images, proxy, upkeep, views


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hubcache: a transparent pull-through cache for container registries (a mitmproxy addon).

    Every subcommand finds the cache folder in --cache-dir, else $HUBCACHE_CACHE_DIR, else the
    `cache_dir` of the --config file, else ./cache.
    """


for command in (
    proxy.run,
    proxy.options_command,
    clients.ca_command,
    clients.setup_command,
    images.prefetch,
    images.export_command,
    images.import_command,
    images.recordings,
    views.stats_command,
    views.ls_command,
    views.misses_command,
    views.watch_command,
    upkeep.prune_command,
    upkeep.rm_command,
    upkeep.verify_command,
):
    main.add_command(command)
