"""The blob server: a process of its own that streams blobs from the store, and the addon
that runs it and signs its URLs."""
