"""The WebSocket endpoint: the gateway (upgrade, auth, read loop) and the command handlers."""
