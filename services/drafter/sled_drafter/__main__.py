"""``python -m sled_drafter`` / ``sled-drafter``: run one edge device's drafter.

Settings come from the SLED_* environment (sled_shared.settings.DrafterSettings);
flags override them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sled_shared.settings import DrafterSettings


def parse_args(argv: Sequence[str] | None = None) -> DrafterSettings:
    p = argparse.ArgumentParser(prog="sled-drafter", description=__doc__.splitlines()[0])
    p.add_argument("--device-name", help="this device's name (default: hostname)")
    p.add_argument("--draft-model", help="draft model from the model registry, or 'ngram'")
    p.add_argument("--target-model", help="target model whose tokenizer and context to use")
    p.add_argument("--nats-url")
    p.add_argument("--http-host")
    p.add_argument("--http-port", type=int)
    p.add_argument("--metrics-port", type=int)
    p.add_argument("--max-k", type=int, help="most draft tokens per round")
    p.add_argument("--max-sessions", type=int, help="generations running at once")
    p.add_argument("--request-timeout-s", type=float, help="timeout of one NATS request")
    args = p.parse_args(argv)
    try:
        settings = DrafterSettings.from_env(**vars(args))
    except (TypeError, ValueError) as exc:
        p.error(str(exc))
    if settings.max_k < 0 or settings.max_sessions < 1 or settings.request_timeout_s <= 0:
        p.error("need --max-k >= 0, --max-sessions >= 1 and --request-timeout-s > 0")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    from sled_drafter.service import run

    try:
        return run(settings)
    except ValueError as exc:  # e.g. a bad SLED_LOG_LEVEL, before logging exists
        print(f"sled-drafter: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
