"""Fixtures of the deployment tests."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from deploy_checks import COMPOSE_FILE


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]
