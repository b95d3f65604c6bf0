"""SLED drafter service."""
