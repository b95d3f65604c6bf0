"""SLED verifier service."""
