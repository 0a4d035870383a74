"""A Python client of the chatserver WebSocket protocol, and a member that recovers
across reconnects."""
