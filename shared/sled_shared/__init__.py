"""SLED/APEX common library shared by every service (nothing heavy in here)."""

__version__ = "0.1.0"
