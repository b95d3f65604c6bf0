"""The `sled` command: one subcommand per small module.

Each module in COMMANDS exposes `add_parser(subparsers)`, which adds its
subcommand and sets `func` (taking the parsed args, returning an exit code)
as a parser default. Command modules keep heavy imports inside their
handlers so that `sled --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Adding a subcommand is one line here: (name, module exposing add_parser).
COMMANDS: tuple[tuple[str, str], ...] = (
    ("models", "sled_shared.cli_models"),
    ("up", "sled_shared.cli_up"),
    ("status", "sled_shared.cli_status"),
    ("generate", "sled_shared.cli_generate"),
)


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sled", description="SLED/APEX edge LLM serving: models, local stack, requests."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in COMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # A group command (e.g. `sled models`) without its action: show its usage.
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    try:
        return int(func(args) or 0)
    except CliError as exc:
        print(f"sled: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sled: interrupted", file=sys.stderr)
        return 130
