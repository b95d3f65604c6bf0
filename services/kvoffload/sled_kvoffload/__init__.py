"""SLED kvoffload service."""
