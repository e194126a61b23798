"""Running the proxy: `hubcache run` (mitmdump with the hubcache addons) and `hubcache options`
(the options it takes). Also what `hubcache prefetch` shares with `run`: the proxy's command-line
options, the `--set` list they make, and mitmproxy's CA in the confdir."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .config import cache_dir_option, config_option, config_settings

if TYPE_CHECKING:
    from mitmproxy.options import Options

CA_CERT = "mitmproxy-ca-cert.pem"


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


def make_ca(confdir: Path) -> Path:
    """Create mitmproxy's CA now, so that instructions and clients can name the file to trust."""
    from mitmproxy.certs import CertStore

    confdir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(str(confdir), "mitmproxy", 2048)
    return confdir.resolve() / CA_CERT


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
    ca_cert = make_ca(confdir)
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
    from mitmproxy.tools import cmdline, dump
    from mitmproxy.tools.main import run as run_mitmproxy

    from ..addons import make_addons

    class HubcacheMaster(dump.DumpMaster):
        def __init__(self, options: Options, **kwargs: Any) -> None:  # DumpMaster's other parameters are untyped
            super().__init__(options, **kwargs)
            self.addons.add(*make_addons())

    run_mitmproxy(HubcacheMaster, cmdline.mitmdump, args)


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
