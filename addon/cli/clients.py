"""Pointing clients at the proxy: `hubcache ca` (the CA they must trust) and `hubcache setup CLIENT`
(the files, environment and commands for dockerd, containerd, podman, skopeo, or a systemd unit for
hubcache itself). The texts themselves come from `client_setup`."""

from __future__ import annotations

from pathlib import Path

import click

from .ca import make_ca
from .config import config_option, config_settings

CLIENTS = ("dockerd", "containerd", "podman", "skopeo", "systemd")


def _ca(confdir: Path, config_file: Path | None) -> Path:
    """The CA as `hubcache run` with the same config file would make it (its `key_size`)."""
    from .proxy import key_size

    try:
        return make_ca(confdir, key_size(config_settings(config_file)))
    except OSError as e:
        raise click.ClickException(f"cannot create the CA in {confdir}: {e.strerror or e}") from e


confdir_option = click.option(
    "--confdir",
    default="certs",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="mitmproxy's confdir, as given to `hubcache run`: the CA is generated here if absent.",
)


@click.command("ca")
@confdir_option
@click.option("--install", is_flag=True, help="Add the CA to this machine's trust store (/usr/local/share/ca-certificates/hubcache.crt).")
@config_option
def ca_command(confdir: Path, install: bool, config_file: Path | None) -> None:
    """Print the CA certificate clients must trust: its path (on stderr) and its PEM (on
    stdout). The CA is generated first if the confdir has none, as `hubcache run` does.

    \b
    Examples:
      hubcache ca
      hubcache ca --confdir /etc/hubcache > hubcache.crt
      hubcache ca --install          # as root, on Debian or Ubuntu
    """
    import shutil
    import subprocess

    from .client_setup import SYSTEM_CA

    ca_cert = _ca(confdir, config_file)
    click.echo(ca_cert, err=True)
    click.echo(ca_cert.read_text(), nl=False)
    if not install:
        return
    tool = shutil.which("update-ca-certificates")
    if tool is None:
        raise click.ClickException(
            f"update-ca-certificates not found: add {ca_cert} to this system's trust store yourself "
            "(Fedora, RHEL: copy it to /etc/pki/ca-trust/source/anchors/ and run update-ca-trust)"
        )
    target = SYSTEM_CA
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ca_cert, target)
    except OSError as e:
        raise click.ClickException(f"cannot write {target}: {e.strerror or e} (run as root)") from e
    done = subprocess.run([tool], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise click.ClickException(f"update-ca-certificates failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    click.echo(f"installed {target} into the system trust store; restart the daemons that read it (dockerd, containerd)", err=True)


@click.command("setup")
@click.argument("client", type=click.Choice(CLIENTS))
@click.option("--proxy", metavar="URL", help="The proxy URL clients use  [default: from --listen-host/--listen-port]")
@click.option("--listen-host", help="hubcache's --listen-host, if not the config file's or 127.0.0.1.")
@click.option("--listen-port", type=int, help="hubcache's --listen-port, if not the config file's or 3128.")
@confdir_option
@click.option("--mirror", is_flag=True, help="Point CLIENT at the mirror endpoint (mirror_listen) instead of the proxy.")
@click.option("--mirror-listen", metavar="ADDRESS:PORT", help="hubcache's mirror_listen, if not the config file's.")
@click.option("--blob-listen", metavar="ADDRESS[:PORT]", help="hubcache's blob_listen, if not the config file's (named in NO_PROXY).")
@config_option
def setup_command(
    client: str,
    proxy: str | None,
    listen_host: str | None,
    listen_port: int | None,
    confdir: Path,
    config_file: Path | None,
    mirror: bool = False,
    mirror_listen: str | None = None,
    blob_listen: str | None = None,
) -> None:
    """Print how to point CLIENT at this hubcache: every file to write, the environment and the
    commands, as a shell script to read (and run as root). For `systemd`: a unit file that runs
    hubcache as a service.

    \b
    Examples:
      hubcache setup dockerd
      hubcache setup containerd --config /etc/hubcache/hubcache.yaml
      hubcache setup skopeo --proxy http://cache.example.internal:3128 --confdir /etc/hubcache
      hubcache setup systemd --listen-port 3128 > hubcache-setup.sh
      hubcache setup dockerd --mirror --mirror-listen 127.0.0.1:5443
    """
    import sys
    from urllib.parse import urlsplit

    from ..blobserver.host import direct_listen
    from ..registry.settings import DEFAULT_REGISTRIES
    from . import client_setup as clientsetup

    configured: dict[str, list[str]] = {}
    for setting in config_settings(config_file):
        name, _, value = setting.partition("=")
        configured.setdefault(name, []).append(value)
    host = listen_host or configured.get("listen_host", ["127.0.0.1"])[-1]
    try:
        port = listen_port or int(configured.get("listen_port", ["3128"])[-1])
    except ValueError:
        raise click.ClickException(f"{config_file}: listen_port is not a number") from None
    if mirror:
        _mirror_setup(client, mirror_listen or configured.get("mirror_listen", [""])[-1], confdir, config_file, configured)
        return
    if client == "systemd":
        executable = Path(sys.executable).with_name("hubcache")
        click.echo(clientsetup.systemd(executable, host, port).text(), nl=False)
        return
    if proxy:
        parts = urlsplit(proxy)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise click.BadParameter(f"{proxy!r} is not a proxy URL like http://127.0.0.1:3128", param_hint="--proxy")
    else:
        proxy = clientsetup.proxy_url(host, port)
    blob_listen = blob_listen if blob_listen is not None else configured.get("blob_listen", [""])[-1]
    try:
        direct = direct_listen(blob_listen, host) if configured.get("blob_urls", ["auto"])[-1] != "loopback" else None
    except ValueError:
        raise click.BadParameter(f"{blob_listen!r} is not ADDRESS[:PORT]", param_hint="--blob-listen") from None
    no_proxy = direct[0] if direct else ""  # where blobs come from directly (see BlobHost)
    ca_cert = _ca(confdir, config_file)
    registries = configured.get("registries") or list(DEFAULT_REGISTRIES)
    setups = {
        "dockerd": lambda: clientsetup.dockerd(proxy, ca_cert, no_proxy),
        "containerd": lambda: clientsetup.containerd(proxy, ca_cert, registries, no_proxy),
        "podman": lambda: clientsetup.podman(proxy, ca_cert, no_proxy),
        "skopeo": lambda: clientsetup.skopeo(proxy, ca_cert, no_proxy),
    }
    click.echo(setups[client]().text(), nl=False)


def _mirror_setup(client: str, listen: str, confdir: Path, config_file: Path | None, configured: dict[str, list[str]]) -> None:
    from ..proxy.mirror import parse_listen
    from ..registry.settings import DEFAULT_REGISTRIES
    from . import client_setup as clientsetup

    if client == "systemd":
        raise click.BadParameter("--mirror is for dockerd, containerd, podman and skopeo", param_hint="--mirror")
    if not listen:
        raise click.ClickException("the mirror endpoint is off: give --mirror-listen ADDRESS:PORT (hubcache's mirror_listen)")
    try:
        address = clientsetup.mirror_address(*parse_listen(listen))
    except ValueError:
        raise click.BadParameter(f"{listen!r} is not ADDRESS:PORT", param_hint="--mirror-listen") from None
    ca_cert = _ca(confdir, config_file)
    registries = configured.get("registries") or list(DEFAULT_REGISTRIES)
    setups = {
        "dockerd": lambda: clientsetup.dockerd_mirror(address, ca_cert),
        "containerd": lambda: clientsetup.containerd_mirror(address, ca_cert, registries),
        "podman": lambda: clientsetup.containers_mirror("podman", address, ca_cert, registries),
        "skopeo": lambda: clientsetup.containers_mirror("skopeo", address, ca_cert, registries),
    }
    click.echo(setups[client]().text(), nl=False)
