"""SLED scheduler service."""
