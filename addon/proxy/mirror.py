"""The mirror endpoint (option `mirror_listen`): a registry in origin form (`/v2/...`), one more
mitmproxy listener (a reverse mode added to `mode`), for engines pointed at hubcache as a registry
mirror. `Mirror` re-targets each request, by the listener it came in on, to the registry it is for;
`MirrorChallenges` points token challenges at the mirror."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader

from ..blobserver.host import LOOPBACK_HOSTS, BlobHost, MirrorListener
from ..blobserver.server import BLOB_HOST
from ..mitm import answers, internals
from ..mitm.flows import Mark, is_subrequest
from ..registry import protocol
from .credentials import TokenRealms
from .interception import Interception

logger = logging.getLogger(__name__)

DOCKER_HUB = "registry-1.docker.io"
# Names containerd's `ns` gives Docker Hub (the image reference's registry part).
DOCKER_HUB_NAMES = ("docker.io", "registry-1.docker.io", "index.docker.io")
TOKEN_PATH = "/hubcache/token/"


def parse_listen(value: str) -> tuple[str, int]:
    """`ADDRESS:PORT` (IPv6 in brackets) -> (address, port); ValueError if it is not one."""
    address, colon, port = value.rpartition(":")
    address = address.strip()
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not (colon and address and port.isdigit() and 0 < int(port) < 65536) or any(c in address for c in "/@ "):
        raise ValueError(value)
    return address, int(port)


class Mirror:
    """Routes the mirror listener's requests (see the module's docstring)."""

    def __init__(self, hosts: Interception, blobs: BlobHost, listener: MirrorListener, realms: TokenRealms) -> None:
        self.hosts = hosts
        self.blobs = blobs
        self.listener = listener  # what the other addons know of the mirror's listener: set only here
        self.realms = realms
        self.listen: tuple[str, int] | None = None
        self._own_cert: tuple[x509.Certificate, Any] | None = None  # the operator's cert and key
        self._entry: certs.CertStoreEntry | None = None
        self._running = False

    def load(self, loader: Loader) -> None:
        loader.add_option(
            "mirror_listen",
            str,
            "",
            "Also serve a registry mirror endpoint (/v2/ in origin form, for dockerd "
            "registry-mirrors, containerd hosts.toml, registries.conf mirrors) on ADDRESS:PORT, "
            "e.g. 127.0.0.1:5443; empty: no mirror.",
        )
        loader.add_option(
            "mirror_names",
            Sequence[str],
            [],
            "More host names or addresses the mirror's certificate names (it always names "
            "localhost, 127.0.0.1, ::1, this machine's host name and the listen address).",
        )
        loader.add_option(
            "mirror_cert",
            str,
            "",
            "A PEM certificate for the mirror (with mirror_key) instead of one issued from "
            "hubcache's CA.",
        )
        loader.add_option("mirror_key", str, "", "The PEM private key of mirror_cert.")
        loader.add_option(
            "mirror_plain_http",
            bool,
            False,
            "Also accept plain HTTP on the mirror's port (for clients that list it in "
            "insecure-registries); otherwise only HTTPS is answered.",
        )

    def configure(self, updated: set[str]) -> None:
        if "mirror_listen" in updated:
            value = ctx.options.mirror_listen.strip()
            try:
                listen = parse_listen(value) if value else None
            except ValueError:
                raise exceptions.OptionsError(f"mirror_listen: {value!r} is not ADDRESS:PORT (e.g. 127.0.0.1:5443)") from None
            old = self.listener.mode
            self.listen = listen
            self.listener.mode = spec(listen) if listen else None
            internals.replace_listener(old, self.listener.mode)
            if listen:
                logger.info(f"hubcache: registry mirror on {value} (https{' and http' if ctx.options.mirror_plain_http else ''})")
        if {"mirror_cert", "mirror_key"} & updated:
            self._own_cert = _read_cert(ctx.options.mirror_cert, ctx.options.mirror_key)
        if {"mirror_listen", "mirror_names"} & updated:
            self._entry = None
        if {"mirror_listen", "mirror_names", "mirror_cert", "mirror_key"} & updated and self._running:
            self._blob_listener()
            self.blobs.restart()

    async def running(self) -> None:
        # mitmproxy may have started its listeners from the modes before this addon added its
        # own (the script loads late): make sure the mirror's listener is up.
        if self.listener.mode and not await internals.start_listeners():
            logger.error(f"hubcache: the registry mirror cannot listen on {ctx.options.mirror_listen}")
        self._running = True
        self._blob_listener()  # before the blob server starts (BlobHost runs after this addon)

    def _blob_listener(self) -> None:
        """A mirror beyond loopback has clients on other machines: the blob server listens for
        them on the mirror's address, with the mirror's certificate."""
        if self.listen and self.listen[0] not in LOOPBACK_HOSTS:
            cert, key = self._certificate()
            pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            self.listener.blob_tls = (self.listen[0] or "0.0.0.0", pem)
        else:
            self.listener.blob_tls = None

    # which requests are the mirror's, and where they go

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or is_subrequest(flow) or not self.hosts.is_mirror(flow.client_conn):
            return
        request = flow.request
        if not flow.client_conn.tls_established and not ctx.options.mirror_plain_http:
            answers.error(flow, protocol.ErrorCode.UNSUPPORTED_REQUEST, "this registry mirror speaks HTTPS only (hubcache: mirror_plain_http is off)")
            return
        path, _, _ = request.path.partition("?")
        if path.startswith(TOKEN_PATH):
            self._to_realm(flow, path[len(TOKEN_PATH) :])
            return
        if not (path == "/v2" or path.startswith("/v2/")):
            answers.error(flow, protocol.ErrorCode.NAME_UNKNOWN, "this is a registry mirror: only /v2/ is served")
            return
        namespace = request.query.get("ns")
        rest = None
        if namespace is None and (prefix := _registry_prefix(path)):
            # podman and skopeo name no registry: a mirror location HOST:PORT/REGISTRY does.
            namespace, rest = prefix
        registry = self.registry_for(namespace)
        if registry is None and namespace is None and path.rstrip("/") == "/v2":
            answers.ping(flow)  # Docker Hub is not cached: the version check is this endpoint's own
            return
        if registry is None:
            answers.error(flow, protocol.ErrorCode.NAME_UNKNOWN, f"this mirror does not serve the registry {namespace!r}")
            return
        if "ns" in request.query:
            del request.query["ns"]
        self._retarget(flow, registry, 443, rest)

    def registry_for(self, namespace: str | None) -> str | None:
        """The registry a mirror request is for: Docker Hub without `ns`, else the cached
        registry `ns` names; None for anything hubcache does not cache."""
        name = (namespace or "docker.io").strip().lower()
        if name in DOCKER_HUB_NAMES:
            name = DOCKER_HUB
        return name if self.hosts.is_registry(name) else None

    def _to_realm(self, flow: http.HTTPFlow, rest: str) -> None:
        """`/hubcache/token/HOST[:PORT]/PATH`: to a token realm a registry named (and only then)."""
        authority, slash, realm_path = rest.partition("/")
        host, colon, port_text = authority.partition(":")
        # ASCII digits only: str.isdigit() takes "²", which int() refuses.
        port = 443 if not colon else int(port_text) if re.fullmatch(r"[0-9]{1,5}", port_text) else 0
        key = (host.lower(), port, "/" + realm_path if slash else "/")
        if not port or self.realms.registry(*key) is None or flow.request.method not in ("GET", "POST"):
            answers.error(flow, protocol.ErrorCode.NAME_UNKNOWN, "not a token service this mirror knows")
            return
        self._retarget(flow, key[0], key[1], key[2])

    def _retarget(self, flow: http.HTTPFlow, host: str, port: int, path: str | None) -> None:
        request = flow.request
        flow.metadata[Mark.MIRROR] = base_url(flow)
        request.scheme, request.host, request.port = "https", host, port
        if path is not None:
            query = request.path.partition("?")[2]
            request.path = path + ("?" + query if query else "")
        request.host_header = host if port == 443 else f"{host}:{port}"
        if via := internals.upstream_proxy():
            flow.server_conn.via = via

    # TLS: the mirror's own certificate

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        if not self.hosts.is_mirror(tls_start.context.client):
            return
        if tls_start.ssl_conn is None:
            # Script addons run before mitmproxy's tlsconfig: let it build the connection (its
            # versions, ciphers, ALPN), then present the mirror's certificate on it.
            internals.tls_start_client(tls_start)
        assert tls_start.ssl_conn is not None
        cert, key = self._certificate()
        tls_start.ssl_conn.use_certificate(cert)
        tls_start.ssl_conn.use_privatekey(key)

    def _certificate(self) -> tuple[x509.Certificate, Any]:
        """The operator's certificate and key, else one issued from hubcache's CA for names()."""
        if self._own_cert:
            return self._own_cert
        if self._entry is None:
            sans = self.names()
            self._entry = internals.certstore().get_cert(str(sans[0].value), sans)
        return self._entry.cert.to_cryptography(), self._entry.privatekey

    def names(self) -> list[x509.GeneralName]:
        """What the mirror's certificate names: what its clients may dial."""
        wanted = [*LOOPBACK_HOSTS, socket.gethostname(), socket.getfqdn()]
        if self.listen and self.listen[0] not in ("0.0.0.0", "::", ""):
            wanted.append(self.listen[0])
        wanted += list(ctx.options.mirror_names)
        names: list[x509.GeneralName] = []
        for name in dict.fromkeys(n.strip().lower() for n in wanted if n and n.strip()):
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        return names


class MirrorChallenges:
    """What mirror clients get back that must name the mirror instead of upstream: a Bearer
    challenge's token realm, and the blob server's loopback URL. Runs after the addons that read
    upstream's answers as they came (credentials learn the realm from the original)."""

    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._rewrite(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._rewrite(flow)

    def _rewrite(self, flow: http.HTTPFlow) -> None:
        base = flow.metadata.get(Mark.MIRROR)
        response = flow.response
        if not base or response is None or is_subrequest(flow):
            return
        if response.status_code == 401 and (header := response.headers.get("www-authenticate")):
            response.headers["www-authenticate"] = self._challenge(flow, header, base)
        elif response.status_code == 307 and (path := self._blob_path(response.headers.get("location", ""))):
            blobs = self.mirror.blobs
            if self.mirror.listen and self.mirror.listen[0] in LOOPBACK_HOSTS and blobs.loopback_port:
                response.headers["location"] = f"http://127.0.0.1:{blobs.loopback_port}{path}"
            elif blobs.mirror_port:
                host = urlsplit(base).netloc.rpartition(":")[0]  # as the client dialled the mirror
                response.headers["location"] = f"https://{host}:{blobs.mirror_port}{path}"

    def _blob_path(self, location: str) -> str:
        """The signed path of a blob URL the cache wrote (either of the blob server's), or ''."""
        for prefix in (f"https://{BLOB_HOST}", f"http://127.0.0.1:{self.mirror.blobs.loopback_port}"):
            if location.startswith(prefix + "/blobs/"):
                return location[len(prefix) :]
        return ""

    def _challenge(self, flow: http.HTTPFlow, header: str, base: str) -> str:
        scheme, fields = protocol.challenge(header)
        realm = fields.get("realm", "")
        if scheme != "bearer" or not realm.startswith("https://") or realm.startswith(base + "/"):
            return header
        parts = urlsplit(realm)
        try:
            port = parts.port or 443
        except ValueError:
            return header
        registry = self.mirror.hosts.registry(flow)
        if not parts.hostname or registry is None:
            return header
        self.mirror.realms.learn(parts.hostname, port, parts.path, registry)
        authority = parts.hostname.lower() + ("" if port == 443 else f":{port}")
        local = f"{base}{TOKEN_PATH}{authority}{quote(parts.path or '/')}"
        return header.replace(f'realm="{realm}"', f'realm="{local}"', 1)


def _registry_prefix(path: str) -> tuple[str, str] | None:
    """(registry, the rest of the path) when the path's first name after /v2/ is a registry's:
    it has a dot or a port, or is localhost (a repository's first component never does on
    Docker Hub, which these requests would otherwise be for)."""
    first, slash, rest = path.removeprefix("/v2/").partition("/")
    if path.startswith("/v2/") and slash and rest and ("." in first or ":" in first or first == "localhost"):
        return first, "/v2/" + rest
    return None


def spec(listen: tuple[str, int]) -> str:
    """The mitmproxy mode of the mirror's listener."""
    host, port = listen
    return f"reverse:https://{DOCKER_HUB}@{f'[{host}]' if ':' in host else host}:{port}"


def base_url(flow: http.HTTPFlow) -> str:
    """The mirror as its client dialled it (its SNI, else the address it connected to)."""
    client = flow.client_conn
    scheme = "https" if client.tls_established else "http"
    address, port = client.sockname[0], client.sockname[1]
    host = client.sni or address
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _read_cert(cert_file: str, key_file: str) -> tuple[x509.Certificate, Any] | None:
    if not cert_file and not key_file:
        return None
    if not (cert_file and key_file):
        raise exceptions.OptionsError("mirror_cert and mirror_key go together: name both files, or neither")
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_file).expanduser().read_bytes())
        key = serialization.load_pem_private_key(Path(key_file).expanduser().read_bytes(), password=None)
    except OSError as e:
        raise exceptions.OptionsError(f"mirror_cert/mirror_key: cannot read {e.filename}: {e.strerror}") from e
    except ValueError as e:
        raise exceptions.OptionsError(f"mirror_cert/mirror_key: not a PEM certificate and unencrypted key ({e})") from e
    public = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*public) != key.public_key().public_bytes(*public):
        raise exceptions.OptionsError(f"mirror_key: {key_file} is not the key of {cert_file}")
    return cert, key
