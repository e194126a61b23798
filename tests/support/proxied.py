"""Single HTTPS requests through an HTTP proxy (CONNECT), for checks at the wire level."""

from __future__ import annotations

import http.client
import json
import ssl
from dataclasses import dataclass
from pathlib import Path


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
) -> Answer:
    """`method https://host/path` through the proxy on 127.0.0.1, trusting only `ca`."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", proxy_port, context=context, timeout=timeout)
    conn.set_tunnel(host, 443)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        conn.close()
