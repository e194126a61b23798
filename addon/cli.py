"""The `hubcache` command line."""

from __future__ import annotations

from pathlib import Path

import click
import yaml

CA_CERT = "mitmproxy-ca-cert.pem"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """hubcache: a transparent pull-through cache for container registries (a mitmproxy addon)."""


@main.command(context_settings={"ignore_unknown_options": False})
@click.option(
    "--cache-dir",
    envvar="HUBCACHE_CACHE_DIR",
    default="cache",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder of the content store and the miss journal.",
)
@click.option(
    "--confdir",
    default="certs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="mitmproxy's confdir: the CA clients must trust is generated here on first start.",
)
@click.option("--listen-host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--listen-port", default=3128, show_default=True, type=int, help="Port to listen on.")
@click.option(
    "--config",
    "config_file",
    envvar="HUBCACHE_CONFIG",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="YAML file of option: value pairs (any mitmproxy or hubcache option); the command line wins.",
)
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="NAME=VALUE",
    help="Any mitmproxy or hubcache option, as for mitmdump (repeatable).",
)
def run(
    cache_dir: Path,
    confdir: Path,
    listen_host: str,
    listen_port: int,
    config_file: Path | None,
    settings: tuple[str, ...],
) -> None:
    """Start the cache: mitmdump with the hubcache addon and these defaults.

    \b
    Examples:
      hubcache run
      hubcache run --listen-port 3129 --cache-dir /var/cache/hubcache
      hubcache run --set tag_freshness=300 --set registries=registry-1.docker.io
    """
    from mitmproxy.certs import CertStore

    explicit = {s.partition("=")[0] for s in settings}
    file_settings = [s for s in _config_settings(config_file) if s.partition("=")[0] not in explicit]
    # Create the CA now, so the instructions can name the file clients must trust.
    confdir.mkdir(parents=True, exist_ok=True)
    CertStore.from_store(str(confdir), "mitmproxy", 2048)
    click.echo(instructions(listen_host, listen_port, confdir.resolve() / CA_CERT), err=True)
    args = ["--listen-host", listen_host, "--listen-port", str(listen_port)]
    for setting in [f"confdir={confdir}", f"cache_dir={cache_dir}", *file_settings, *settings]:
        args += ["--set", setting]
    _mitmdump_with_hubcache(args)


def _mitmdump_with_hubcache(args: list[str]) -> None:
    """mitmdump with the addons built in rather than loaded as a script, so that a bad option
    value is refused by mitmproxy's own option handling: one line, no traceback."""
    from mitmproxy.tools import cmdline, dump
    from mitmproxy.tools.main import run as run_mitmproxy

    from .hubcache import addons

    class HubcacheMaster(dump.DumpMaster):
        def __init__(self, options, **kwargs):
            super().__init__(options, **kwargs)
            self.addons.add(*addons)

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
