"""Debian's Chromium, headless, as a test reads a page: the DOM after its scripts ran, and a screenshot."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Run as root in CI, on a machine without network: no sandbox (it needs user namespaces) and
# none of the background fetches that would only fail.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--virtual-time-budget=4000",  # let the page's fetches finish before the DOM is read
]


def _chromium(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="hubcache-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def rendered_dom(url: str) -> str:
    result = _chromium("--dump-dom", url)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def screenshot(url: str, path: Path, size: str = "1200,1400") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    result = _chromium(f"--screenshot={path}", f"--window-size={size}", url)
    assert result.returncode == 0 and path.exists(), result.stderr[-2000:]
    return path
