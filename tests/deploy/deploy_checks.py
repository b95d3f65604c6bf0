"""What the deployment files are checked against: the project's own entry
points and settings."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path
from typing import Any

from sled_shared.cli import build_parser
from sled_shared.settings import (
    CommonSettings,
    DrafterSettings,
    KVOffloadSettings,
    SchedulerSettings,
    VerifierSettings,
)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PYPROJECTS = (ROOT / "shared" / "pyproject.toml", *sorted(ROOT.glob("services/*/pyproject.toml")))

# Which settings class a process reads, by the program it starts as.
SETTINGS_BY_PROGRAM: dict[str, type[CommonSettings]] = {
    "sled": CommonSettings,
    "sled-verifier": VerifierSettings,
    "sled-drafter": DrafterSettings,
    "sled-kvoffload": KVOffloadSettings,
    "sled-scheduler": SchedulerSettings,
}
ALL_SETTINGS: tuple[type[CommonSettings], ...] = tuple(SETTINGS_BY_PROGRAM.values())


def project_scripts() -> dict[str, Path]:
    """Console scripts declared by the project's packages -> their pyproject."""
    scripts: dict[str, Path] = {}
    for pyproject in PYPROJECTS:
        data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        for name in data["project"].get("scripts", {}):
            scripts[name] = pyproject
    return scripts


def declared_env_vars(program: str | None) -> set[str]:
    """SLED_* variables ``program`` reads; for a third-party program, all of them."""
    if program in SETTINGS_BY_PROGRAM:
        return set(SETTINGS_BY_PROGRAM[program].env_vars())
    return {name for cls in ALL_SETTINGS for name in cls.env_vars()}


def check_command(command: list[str]) -> str:
    """Assert ``command`` starts one of the project's programs; return its name.

    ``sled`` subcommands are parsed by the real CLI parser, so a misspelt
    subcommand or flag fails here as it would in the container.
    """
    program = command[0]
    assert program in project_scripts(), f"{program!r} is no console script of the project"
    if program == "sled":
        try:
            args = build_parser().parse_args(command[1:])
        except SystemExit as exc:
            raise AssertionError(f"`{' '.join(command)}` is rejected by the sled CLI") from exc
        assert isinstance(args, argparse.Namespace)
        assert getattr(args, "func", None) is not None, f"`{' '.join(command)}` runs no action"
    return program


def check_settings(program: str, environ: dict[str, str]) -> None:
    """The SLED_* variables are ones ``program`` reads, and their values parse."""
    sled_vars = {name for name in environ if name.startswith("SLED_")}
    unknown = sled_vars - declared_env_vars(program)
    assert not unknown, f"{program}: {sorted(unknown)} not declared in sled_shared/settings.py"
    if program in SETTINGS_BY_PROGRAM:
        SETTINGS_BY_PROGRAM[program].from_env(environ)


_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")


def compose_defaults(value: str) -> str:
    """A compose value as it is without a .env file: ``${X:-d}`` becomes ``d``.

    A bare ``${X}`` would leave the value empty on a fresh checkout, which the
    stack must not need, so it fails.
    """

    def substitute(match: re.Match[str]) -> str:
        default = match.group("default")
        assert default is not None, f"{match.group(0)} has no default"
        return default

    return _INTERPOLATION.sub(substitute, value)


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {name: compose_defaults(str(value)) for name, value in env.items()}


def built_here(service: dict[str, Any]) -> bool:
    """Built from one of the project's Dockerfiles (not a third-party image)."""
    return "build" in service
