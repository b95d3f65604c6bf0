"""`sled models ...`: build the model cache, list it, register local model dirs."""

from __future__ import annotations

import argparse
from pathlib import Path

from sled_shared.cli import CliError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("models", help="prepare, list and register models")
    group.set_defaults(group_parser=group)
    actions = group.add_subparsers(dest="models_command", metavar="ACTION")

    prep = actions.add_parser(
        "prepare", help="build the SmolLM2 target and int4/int8 drafts into the cache"
    )
    prep.add_argument("--force", action="store_true", help="rebuild even what is up to date")
    prep.add_argument("--cache", type=Path, help="model cache dir (default: $SLED_MODEL_CACHE)")
    prep.set_defaults(func=_prepare)

    ls = actions.add_parser("list", help="show the registered models")
    ls.add_argument("--cache", type=Path, help="model cache dir (default: $SLED_MODEL_CACHE)")
    ls.set_defaults(func=_list)

    reg = actions.add_parser("register", help="add your own local model directory")
    reg.add_argument("--name", required=True, help="name to refer to the model by")
    reg.add_argument("--role", required=True, choices=("target", "draft"))
    reg.add_argument("--kind", required=True, choices=("hf", "ort-genai"))
    reg.add_argument("--path", required=True, type=Path, help="the model directory")
    reg.add_argument("--cache", type=Path, help="model cache dir (default: $SLED_MODEL_CACHE)")
    reg.set_defaults(func=_register)


def _prepare(args: argparse.Namespace) -> int:
    from sled_shared.models.prepare import PrepareError, prepare

    try:
        report = prepare(cache=args.cache, force=args.force)
    except PrepareError as exc:
        raise CliError(f"models prepare: {exc}") from exc
    total_mb = sum(s.size_bytes for s in report.steps) / 1e6
    print(f"models ready in {report.cache} ({total_mb:.0f} MB, {report.seconds:.1f}s)")
    return 0


def _list(args: argparse.Namespace) -> int:
    from sled_shared.models import registry

    try:
        entries = registry.load_registry(args.cache)
    except registry.ModelRegistryError as exc:
        raise CliError(str(exc)) from exc
    rows = [("NAME", "ROLE", "KIND", "STATUS", "PATH")]
    for entry in sorted(entries.values(), key=lambda e: (e.role != "target", e.name)):
        if entry.path is None:
            status, where = "ok", "-"
        else:
            status, where = ("ok" if entry.path.is_dir() else "missing"), str(entry.path)
        rows.append((entry.name, entry.role, entry.kind, status, where))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[4])
    return 0


def _register(args: argparse.Namespace) -> int:
    from sled_shared.models import registry

    try:
        entry = registry.register_model(args.name, args.role, args.kind, args.path, args.cache)
    except registry.ModelRegistryError as exc:
        raise CliError(f"models register: {exc}") from exc
    print(f"registered {entry.name} ({entry.role}, {entry.kind}) at {entry.path}")
    return 0
