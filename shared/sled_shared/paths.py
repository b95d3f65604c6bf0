"""Where things live on disk, overridable by environment variables."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

MODEL_CACHE_ENV = "SLED_MODEL_CACHE"


def model_cache_dir() -> Path:
    """Root of the prepared model cache (targets, drafts, registry file)."""
    override = os.environ.get(MODEL_CACHE_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(platformdirs.user_cache_dir("sled")) / "models"
