"""Registry logins for `hubcache prefetch`, found the way container engines keep them: `--creds`,
then podman/skopeo's `auth.json`, then docker's `config.json` (the longest key covering the
repository wins). Nothing here sends anything; docs/airgap.md lists where each is looked for."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..registry.protocol import ImageReference, canonical_registry
from ..registry.settings import read_credentials


class LoginError(ValueError):
    """A login source that cannot be used; the message is for an operator."""


@dataclass
class Logins:
    """USER:SECRET by `registry[/namespace]` key, and where each came from."""

    creds: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    helpers: dict[str, str] = field(default_factory=dict)  # registry -> the helper that keeps its login

    def add(self, key: str, secret: str, origin: str) -> None:
        if key not in self.creds:  # the first source wins
            self.creds[key], self.origin[key] = secret, origin

    def find(self, image: ImageReference) -> str | None:
        """The login for `image`: the longest key naming its registry or a namespace above it."""
        parts = [image.registry, *image.repository.split("/")]
        for n in range(len(parts), 0, -1):
            secret = self.creds.get("/".join(parts[:n]))
            if secret:
                return secret
        return None

    def unsupported(self, image: ImageReference) -> str | None:
        """A one-line note when `image`'s registry keeps its login where hubcache cannot read it."""
        if self.find(image) is None and image.registry in self.helpers:
            return f"{image.registry}: the login is kept by {self.helpers[image.registry]}, which hubcache cannot read; use --creds"
        return None


def auth_key(key: str) -> str:
    """`registry[/namespace]` from an `auths` key: no scheme, docker's `/v1/` dropped, Docker Hub's
    names made `docker.io`."""
    rest = key.strip().split("://", 1)[-1].rstrip("/")
    host, _, path = rest.partition("/")
    if path in ("v1", "v2"):
        path = ""
    return "/".join(filter(None, [canonical_registry(host), path]))


def load(
    creds: list[str],
    images: list[ImageReference],
    authfile: Path | None = None,
    env: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Logins:
    """Every login prefetch may present for `images`; raises LoginError for a source that was
    named and cannot be used (an engine's file that is absent is no error)."""
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    logins = Logins()
    registries = sorted({i.registry for i in images})
    for spec in creds:
        registry, equals, source = spec.partition("=")
        if not equals or source == "" or registry.startswith(("@", "env:")):
            registry, source = "", spec
            if len(registries) != 1:
                raise LoginError(
                    f"--creds {spec}: the images are on {len(registries)} registries ({', '.join(registries)}); "
                    "say which one: --creds REGISTRY=@FILE"
                )
            registry = registries[0]
        key = auth_key(registry)
        try:
            logins.add(key, read_credentials(key, source), "--creds")
        except ValueError as e:
            raise LoginError(f"--creds: {e}") from None
    if authfile is not None:
        if not authfile.is_file():
            raise LoginError(f"--authfile {authfile}: no such file")
        _read(logins, authfile)
    else:
        runtime = env.get("XDG_RUNTIME_DIR")
        candidates = [
            Path(env["REGISTRY_AUTH_FILE"]) if env.get("REGISTRY_AUTH_FILE") else None,
            Path(runtime) / "containers" / "auth.json" if runtime else None,
            home / ".config" / "containers" / "auth.json",
        ]
        found = next((p for p in candidates if p is not None and p.is_file()), None)
        if found:
            _read(logins, found)
    docker = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    if (docker / "config.json").is_file():
        _read(logins, docker / "config.json")
    return logins


def _read(logins: Logins, path: Path) -> None:
    try:
        data = json.loads(path.read_text())
        auths = data.get("auths") or {}
        store = data.get("credsStore")
        helpers = data.get("credHelpers") or {}
        if not isinstance(auths, dict) or not isinstance(helpers, dict):
            raise ValueError("auths and credHelpers must be objects")
    except OSError as e:
        raise LoginError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, AttributeError) as e:
        raise LoginError(f"{path} is not a login file ({e})") from None
    for raw_key, entry in auths.items():
        key = auth_key(raw_key)
        encoded = entry.get("auth") if isinstance(entry, dict) else None
        if encoded:
            try:
                secret = base64.b64decode(encoded, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise LoginError(f"{path}: the login for {raw_key} is not base64 USER:SECRET") from None
            if ":" not in secret or secret.startswith(":"):
                raise LoginError(f"{path}: the login for {raw_key} is not USER:SECRET")
            logins.add(key, secret, str(path))
        elif store:
            logins.helpers.setdefault(key.partition("/")[0], f"credsStore {store!r} in {path}")
    for raw_key, helper in helpers.items():
        logins.helpers.setdefault(auth_key(raw_key).partition("/")[0], f"credHelpers {helper!r} in {path}")
