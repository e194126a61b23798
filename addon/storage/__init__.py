"""The cache folder's content: the digest-keyed store, the miss journal, recordings, bundles,
and eviction."""
