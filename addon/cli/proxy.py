"""Running the proxy: `hubcache run` (mitmdump with the hubcache addons) and `hubcache options`
(the options it takes). Also what `hubcache prefetch` shares with `run`: the proxy's command-line
options, the `--set` list they make, and the key size they ask of the CA (cli/ca.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..units import decimal
from .ca import make_ca
from .config import cache_dir_option, config_option, config_settings

if TYPE_CHECKING:
    from mitmproxy.options import Options
    from mitmproxy.tools.dump import DumpMaster

def proxy_options[F: Callable[..., Any]](command: F) -> F:
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


def proxy_settings(
    cache_dir: Path | None, config_file: Path | None, confdir: Path, record: str | None, settings: tuple[str, ...]
) -> list[str]:
    """The `--set` list for the proxy: the config file, overridden by the command line."""
    named = [f"cache_dir={cache_dir}"] if cache_dir else []
    named += [f"record={record}"] if record else []
    explicit = {s.partition("=")[0] for s in [*named, *settings]}
    from_file = [s for s in config_settings(config_file) if s.partition("=")[0] not in explicit]
    given = [*from_file, *named, *settings]
    default = [] if any(s.startswith("cache_dir=") for s in given) else ["cache_dir=cache"]
    return [f"confdir={confdir}", *default, *given]


def key_size(settings: list[str]) -> int | None:
    """mitmproxy's `key_size` when the operator set it: then the CA made on first start is
    mitmproxy's own RSA one of that size."""
    sizes = [value for name, _, value in (s.partition("=") for s in settings) if name == "key_size"]
    return decimal(sizes[-1]) if sizes else None


@click.command()
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
    options = proxy_settings(cache_dir, config_file, confdir, record, settings)
    ca_cert = make_ca(confdir, key_size(options))
    click.echo(instructions(listen_host, listen_port, ca_cert), err=True)
    args = ["--listen-host", listen_host, "--listen-port", str(listen_port)]
    for setting in options:
        args += ["--set", setting]
    _mitmdump_with_hubcache(args)


def instructions(host: str, port: int, ca_cert: Path) -> str:
    """What `hubcache run` prints on start: how to point dockerd (and the others) at it."""
    from . import client_setup as clientsetup

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


def _mitmdump_with_hubcache(args: list[str]) -> None:
    """mitmdump with the addons built in rather than loaded as a script, so that a bad option
    value is refused by mitmproxy's own option handling: one line, no traceback."""
    from mitmproxy.tools import cmdline
    from mitmproxy.tools.main import run as run_mitmproxy

    run_mitmproxy(master_class(), cmdline.mitmdump, args)


def master_class() -> type[DumpMaster]:
    """mitmdump's master with hubcache's addons, as one addon of its chain."""
    from mitmproxy.tools import dump

    from ..addons import Hubcache

    class HubcacheMaster(dump.DumpMaster):
        def __init__(self, options: Options, **kwargs: Any) -> None:  # DumpMaster's other parameters are untyped
            super().__init__(options, **kwargs)
            self.addons.add(Hubcache())

    return HubcacheMaster


@click.command("options")
@click.option("--markdown", is_flag=True, help="Print the table docs/options.md carries.")
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

    from . import options_table as reference
    from .progress import console

    if markdown:
        click.echo(reference.markdown())
        return
    table = Table("option", "type", "default", "meaning", show_lines=True)
    for option in reference.options():
        table.add_row(*(escape(cell) for cell in (option.name, option.type, option.default, option.help)))
    console.print(table)
