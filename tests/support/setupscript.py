"""Reads what `hubcache setup CLIENT` prints, the way an operator applies it: the files it writes,
the variables it exports and the commands it runs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_FILE = re.compile(r"^cat > (\S+) <<'EOF'\n(.*?)\nEOF$", re.M | re.S)
_EXPORT = re.compile(r"^export (\w+)=(\S+)$", re.M)


@dataclass
class Script:
    files: dict[str, str]
    env: dict[str, str]
    commands: list[str]
    notes: list[str]  # the comments

    def write_files(self, root: Path) -> None:
        """Write every file under `root`, as if `root` were /."""
        for path, content in self.files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content + "\n")

    def drop_in_environment(self, service: str) -> dict[str, str]:
        """The Environment= lines of the service's systemd drop-in."""
        text = self.files[f"/etc/systemd/system/{service}.service.d/http-proxy.conf"]
        return dict(m.split("=", 1) for m in re.findall(r'^Environment="([^"]+)"$', text, re.M))


def parse(text: str) -> Script:
    files = {path: content for path, content in _FILE.findall(text)}
    rest = _FILE.sub("", text)
    commands = [
        line
        for line in rest.splitlines()
        if line and not line.startswith(("#", "export ", "mkdir -p "))
    ]
    notes = [line[2:] for line in rest.splitlines() if line.startswith("# ")]
    return Script(files, dict(_EXPORT.findall(rest)), commands, notes)
