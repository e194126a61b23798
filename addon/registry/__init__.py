"""The registry wire protocol and per-registry settings: plain values, nothing of mitmproxy."""
