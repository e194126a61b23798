"""Single HTTPS requests through an HTTP proxy (CONNECT), for checks at the wire level."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    complete: bool = True  # False when the connection broke before the announced length

    def json(self) -> dict:
        return json.loads(self.body)


@contextmanager
def opened(
    proxy_port: int,
    host: str,
    path: str,
    *,
    ca: Path,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30,
    follow: bool = True,
) -> Iterator[http.client.HTTPResponse]:
    """The response to `method https://host/path` through the proxy on 127.0.0.1, trusting only
    `ca`, its body unread. Redirects are followed as registry clients do (Range kept,
    Authorization dropped for another host) unless `follow` is false: https URLs through the
    proxy, loopback http URLs directly."""
    headers = dict(headers or {})
    scheme, port = "https", 443
    for _ in range(6):
        if scheme == "http":  # a loopback URL: fetched directly, as Go clients do
            conn: http.client.HTTPConnection = http.client.HTTPConnection(host, port, timeout=timeout)
        else:
            context = ssl.create_default_context(cafile=str(ca))
            conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=context, timeout=timeout)
            conn.set_tunnel(host, port)
        try:
            conn.request(method, path, headers=headers)
            response = conn.getresponse()
            if not (follow and response.status in (301, 302, 303, 307, 308)):
                yield response
                return
            response.read()
        finally:
            conn.close()
        target = urlsplit(urljoin(f"{scheme}://{host}{path}", response.headers["Location"]))
        assert target.scheme == "https" or target.hostname == "127.0.0.1", f"redirected to {target.geturl()}"
        if target.hostname != host:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        scheme, host, port = target.scheme, target.hostname, target.port or 443
        path = target.path + (f"?{target.query}" if target.query else "")
    raise AssertionError(f"too many redirects at {scheme}://{host}{path}")


def request(proxy_port: int, host: str, path: str, *, ca: Path, **options) -> Answer:
    """The whole answer; a body cut short is returned as far as it came, with complete=False."""
    with opened(proxy_port, host, path, ca=ca, **options) as response:
        try:
            return Answer(response.status, response.headers, response.read())
        except http.client.IncompleteRead as e:
            return Answer(response.status, response.headers, e.partial, complete=False)


def docker_hub_token(proxy_port: int, repository: str, *, ca: Path, credentials: tuple[str, str] | None = None) -> str:
    """A pull token for `repository` from the Docker Hub double's token service, through the
    proxy: anonymous, or for a user with Basic credentials."""
    headers = {}
    if credentials:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
    answer = request(
        proxy_port, "auth.docker.io", f"/token?service=registry.docker.io&scope=repository:{repository}:pull",
        ca=ca, headers=headers,
    )
    assert answer.status == 200, answer.body
    return json.loads(answer.body)["token"]
