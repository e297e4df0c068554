"""Peer implementations measured against fcn-jax in the same run (benchmark-only)."""
