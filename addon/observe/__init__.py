"""What operators see: Prometheus metrics, the pull log, the status page."""
