"""What each container client needs to pull through hubcache: the proxy and the CA to trust.

One function per client; each returns a `Setup` whose text is a shell script an operator can read
and run as root: every configuration file as a `cat > PATH <<'EOF'` block, environment variables
as `export` lines, and the commands that apply them. Nothing here writes anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..registry.protocol import canonical_registry

SYSTEM_CA = Path("/usr/local/share/ca-certificates/hubcache.crt")
CONTAINERD_HOSTS_DIR = Path("/etc/containerd/certs.d")
CONTAINERS_CERTS_DIR = Path("/etc/containers/certs.d")
SERVICE_CACHE_DIR = Path("/var/cache/hubcache")
SERVICE_CONFDIR = Path("/etc/hubcache")


@dataclass(frozen=True)
class ConfigFile:
    path: Path
    content: str


@dataclass
class Setup:
    title: str
    notes: list[str] = field(default_factory=list)  # printed as comments, before everything
    files: list[ConfigFile] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)  # run after the files are written

    def text(self) -> str:
        lines = [f"# {self.title}"]
        lines += [f"# {note}" for note in self.notes]
        for f in self.files:
            lines += ["", f"mkdir -p {f.path.parent}", f"cat > {f.path} <<'EOF'", f.content.rstrip("\n"), "EOF"]
        if self.env:
            lines.append("")
            lines += [f"export {name}={value}" for name, value in self.env.items()]
        if self.commands:
            lines.append("")
            lines += self.commands
        return "\n".join(lines) + "\n"


def proxy_url(host: str, port: int) -> str:
    """The URL a client on this machine uses for a proxy listening on host:port."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _install_system_ca(ca_cert: Path) -> list[str]:
    return [f"cp {ca_cert} {SYSTEM_CA}", "update-ca-certificates"]


def _proxy_env(proxy: str, no_proxy: str = "") -> dict[str, str]:
    # Go clients read either spelling (NO_PROXY first); curl-based tools only the lower case one.
    env = {"HTTPS_PROXY": proxy, "https_proxy": proxy}
    if no_proxy:
        env |= {"NO_PROXY": no_proxy, "no_proxy": no_proxy}
    return env


def _no_proxy_notes(no_proxy: str) -> list[str]:
    if not no_proxy:
        return []
    return [
        f"NO_PROXY={no_proxy}: blobs come from hubcache's blob server at that address, directly, not",
        "through the proxy (Go clients match an address without its port, in every Go version). Add",
        "it to a NO_PROXY the client already has; without it, blobs are relayed through the proxy.",
    ]


def _systemd_drop_in(service: str, proxy: str, no_proxy: str = "") -> ConfigFile:
    lines = f'[Service]\nEnvironment="HTTPS_PROXY={proxy}"\n'
    if no_proxy:
        lines += f'Environment="NO_PROXY={no_proxy}"\n'
    return ConfigFile(Path(f"/etc/systemd/system/{service}.service.d/http-proxy.conf"), lines)


def dockerd(proxy: str, ca_cert: Path, no_proxy: str = "") -> Setup:
    return Setup(
        "dockerd: pulls made by the daemon go through hubcache.",
        notes=[
            "For Docker Hub dockerd trusts only the system pool (it ignores /etc/docker/certs.d),",
            "so the CA goes into the system store. The proxy goes into a systemd drop-in (dockerd reads",
            "its own environment, not the shell's); with Engine 23 or later it may go into",
            "/etc/docker/daemon.json instead (merge it into the file's object; older engines refuse",
            "to start with it):",
            f"  {daemon_json_proxies(proxy, no_proxy)}",
            "dockerd reads the proxy and the CA only at start.",
            *_no_proxy_notes(no_proxy),
        ],
        files=[_systemd_drop_in("docker", proxy, no_proxy)],
        commands=[*_install_system_ca(ca_cert), "systemctl daemon-reload && systemctl restart docker"],
    )


def daemon_json_proxies(proxy: str, no_proxy: str = "") -> str:
    proxies = {"https-proxy": proxy} | ({"no-proxy": no_proxy} if no_proxy else {})
    return json.dumps({"proxies": proxies})


def _hosts_tomls(registries: list[str], ca_cert: Path, host: str = "") -> list[ConfigFile]:
    """One containerd hosts.toml per cached registry: its pulls go to `host` (the registry itself
    when empty), trusting hubcache's CA."""
    files = []
    for name in _registry_names(registries):
        server = "https://registry-1.docker.io" if name == "docker.io" else f"https://{name}"
        files.append(
            ConfigFile(
                CONTAINERD_HOSTS_DIR / name / "hosts.toml",
                f'server = "{server}"\n\n[host."{host or server}"]\n  capabilities = ["pull", "resolve"]\n  ca = "{ca_cert}"\n',
            )
        )
    return files


def containerd(proxy: str, ca_cert: Path, registries: list[str], no_proxy: str = "") -> Setup:
    files = [_systemd_drop_in("containerd", proxy, no_proxy), *_hosts_tomls(registries, ca_cert)]
    return Setup(
        "containerd: the daemon's pulls (kubelet, CRI) and ctr's own pulls go through hubcache.",
        notes=[
            "The daemon pulls with the environment of containerd.service and, for the CRI plugin,",
            f'the hosts.toml files below once /etc/containerd/config.toml sets config_path = "{CONTAINERD_HOSTS_DIR}"',
            '  under [plugins."io.containerd.grpc.v1.cri".registry]; then restart containerd.',
            "ctr pulls client-side, in its own process: give it the proxy in its environment and",
            f"--hosts-dir {CONTAINERD_HOSTS_DIR} (ctr reads no hosts.toml without it), e.g.",
            f"  HTTPS_PROXY={proxy} ctr image pull --hosts-dir {CONTAINERD_HOSTS_DIR} docker.io/library/alpine:3.20",
            "Instead of the hosts.toml files, the CA may go into the system store",
            f"  (cp {ca_cert} {SYSTEM_CA} && update-ca-certificates).",
            *_no_proxy_notes(no_proxy),
        ],
        files=files,
        env=_proxy_env(proxy, no_proxy),
        commands=["systemctl daemon-reload && systemctl restart containerd"],
    )


def _registry_names(registries: list[str]) -> list[str]:
    """hosts.toml folders: one per registry, Docker Hub's API hosts folded into docker.io."""
    return list(dict.fromkeys(canonical_registry(host) for host in registries))


def _containers(client: str, proxy: str, ca_cert: Path, no_proxy: str = "") -> Setup:
    return Setup(
        f"{client}: pulls made by each {client} command go through hubcache.",
        notes=[
            f"{client} reads the proxy from its environment and the CA from {CONTAINERS_CERTS_DIR}/<registry>/,",
            "a folder named after the registry as written in image names: docker.io, not registry-1.docker.io.",
            *_no_proxy_notes(no_proxy),
        ],
        files=[ConfigFile(CONTAINERS_CERTS_DIR / "docker.io" / "hubcache.crt", ca_cert.read_text())],
        env=_proxy_env(proxy, no_proxy),
    )


def podman(proxy: str, ca_cert: Path, no_proxy: str = "") -> Setup:
    return _containers("podman", proxy, ca_cert, no_proxy)


def skopeo(proxy: str, ca_cert: Path, no_proxy: str = "") -> Setup:
    return _containers("skopeo", proxy, ca_cert, no_proxy)


def systemd_unit(hubcache: Path, listen_host: str, listen_port: int) -> str:
    """A unit that runs hubcache as a service, as a user of its own, with its cache under
    /var/cache/hubcache and its CA (and any config.yaml) under /etc/hubcache."""
    args = (
        f"{hubcache} run --cache-dir {SERVICE_CACHE_DIR} --confdir {SERVICE_CONFDIR}"
        f" --listen-host {listen_host} --listen-port {listen_port}"
    )
    return f"""\
[Unit]
Description=hubcache: pull-through cache for container registries
Wants=network-online.target
After=network-online.target
Before=docker.service containerd.service

[Service]
User=hubcache
Group=hubcache
ExecStart={args}
Restart=on-failure
RestartSec=5
# Other options go into {SERVICE_CONFDIR}/config.yaml (mitmproxy reads it from its confdir), where
# the CA is also generated on first start; the cache folder belongs to the service.
CacheDirectory=hubcache
CacheDirectoryMode=0750
ReadWritePaths={SERVICE_CONFDIR}
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
NoNewPrivileges=yes

[Install]
WantedBy=multi-user.target
"""


def systemd(hubcache: Path, listen_host: str, listen_port: int) -> Setup:
    return Setup(
        "systemd: run hubcache as a service (as the user hubcache).",
        notes=[
            f"Then point clients at it with `hubcache setup CLIENT --confdir {SERVICE_CONFDIR}`.",
        ],
        files=[ConfigFile(Path("/etc/systemd/system/hubcache.service"), systemd_unit(hubcache, listen_host, listen_port))],
        commands=[
            f"id hubcache >/dev/null 2>&1 || useradd --system --home-dir {SERVICE_CACHE_DIR} --shell /usr/sbin/nologin hubcache",
            f"install -d -o hubcache -g hubcache -m 0750 {SERVICE_CONFDIR}",
            "systemctl daemon-reload && systemctl enable --now hubcache",
        ],
    )


# the mirror endpoint (`mirror_listen`): the engine's own mirror settings, the CA per host

DOCKER_CERTS_DIR = Path("/etc/docker/certs.d")
REGISTRIES_CONF_DROP_IN = Path("/etc/containers/registries.conf.d/hubcache-mirror.conf")


def mirror_address(host: str, port: int) -> str:
    """HOST:PORT as a client on this machine dials a mirror listening on host:port."""
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"{host}:{port}"


def dockerd_mirror(mirror: str, ca_cert: Path) -> Setup:
    return Setup(
        "dockerd: Docker Hub pulls go to hubcache's mirror endpoint (registry-mirrors).",
        notes=[
            "Merge this key into the object in /etc/docker/daemon.json (create the file if absent):",
            f"  {json.dumps({'registry-mirrors': [f'https://{mirror}']})}",
            f"The CA is trusted for the mirror's host only ({DOCKER_CERTS_DIR}/{mirror}/ca.crt): no system-wide CA.",
            "dockerd uses registry-mirrors for Docker Hub images only; it reads daemon.json at start.",
        ],
        files=[ConfigFile(DOCKER_CERTS_DIR / mirror / "ca.crt", ca_cert.read_text())],
        commands=["systemctl restart docker"],
    )


def containerd_mirror(mirror: str, ca_cert: Path, registries: list[str]) -> Setup:
    files = _hosts_tomls(registries, ca_cert, f"https://{mirror}")
    return Setup(
        "containerd: pulls of every cached registry go to hubcache's mirror endpoint (hosts.toml).",
        notes=[
            "containerd names the registry in each request to a mirror (?ns=ghcr.io), so one endpoint",
            "serves them all. The CRI plugin reads these files once /etc/containerd/config.toml sets",
            f'  config_path = "{CONTAINERD_HOSTS_DIR}" under [plugins."io.containerd.grpc.v1.cri".registry];',
            f"ctr reads them with --hosts-dir {CONTAINERD_HOSTS_DIR}, e.g.",
            f"  ctr image pull --hosts-dir {CONTAINERD_HOSTS_DIR} docker.io/library/alpine:3.20",
        ],
        files=files,
        commands=["systemctl restart containerd"],
    )


def containers_mirror(client: str, mirror: str, ca_cert: Path, registries: list[str]) -> Setup:
    entries = []
    for name in _registry_names(registries):
        # podman and skopeo name no registry to a mirror: a path after HOST:PORT does.
        location = mirror if name == "docker.io" else f"{mirror}/{name}"
        entries.append(f'[[registry]]\nprefix = "{name}"\nlocation = "{name}"\n\n[[registry.mirror]]\nlocation = "{location}"\n')
    return Setup(
        f"{client}: pulls of every cached registry go to hubcache's mirror endpoint (registries.conf).",
        notes=[
            f"{client} names no registry to a mirror; each mirror location below names it in its path",
            "(HOST:PORT/ghcr.io), except Docker Hub's, which the endpoint serves by default.",
        ],
        files=[
            ConfigFile(REGISTRIES_CONF_DROP_IN, "\n".join(entries)),
            ConfigFile(CONTAINERS_CERTS_DIR / mirror / "ca.crt", ca_cert.read_text()),
        ],
    )
