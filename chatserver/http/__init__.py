"""The REST API, its middleware and the health probes."""
