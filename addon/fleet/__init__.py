"""Several nodes sharing one S3 store and a lock."""
