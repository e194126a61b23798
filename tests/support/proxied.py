"""Single HTTPS requests through an HTTP proxy (CONNECT), for checks at the wire level."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin, urlsplit


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def request(
    proxy_port: int,
    host: str,
    path: str,
    *,
    ca: Path,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 30,
    follow: bool = True,
) -> Answer:
    """`method https://host/path` through the proxy on 127.0.0.1, trusting only `ca`. Redirects
    to https URLs are followed through the proxy (as registry clients do, with Range kept and
    Authorization dropped for another host) unless `follow` is false."""
    answer = _once(proxy_port, host, path, ca, method, headers or {}, timeout)
    hops = 0
    while follow and answer.status in (301, 302, 303, 307, 308) and hops < 5:
        target = urlsplit(urljoin(f"https://{host}{path}", answer.headers["Location"]))
        assert target.scheme == "https", f"redirected to {target.geturl()}"
        if target.hostname != host:
            headers = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
        host, path = target.hostname, target.path + (f"?{target.query}" if target.query else "")
        answer = _once(proxy_port, host, path, ca, method, headers or {}, timeout)
        hops += 1
    return answer


def _once(proxy_port: int, host: str, path: str, ca: Path, method: str, headers: dict[str, str], timeout: float) -> Answer:
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=context, timeout=timeout)
    conn.set_tunnel(host, 443)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()
