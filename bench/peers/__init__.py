"""Peer servers the benchmarks compare chatserver with (see bench/peers/README.md)."""
