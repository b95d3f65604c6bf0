"""`sled up`: run the local stack in the foreground until Ctrl-C / SIGTERM.

Prints one line per endpoint (service, kind, URL), then `ready`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO

from sled_shared.cli import CliError

_OPTIONAL = ("scheduler", "kvoffload")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "up",
        help="run the local stack (NATS, scheduler, kvoffload, verifier, drafters) until Ctrl-C",
        description=(
            "Start an embedded NATS (unless SLED_NATS_URL is set), the scheduler, a KV-offload "
            "worker, the verifier and one drafter per device, each as its own process; wait "
            "until each is ready; print their URLs. Other SLED_* variables in the environment "
            "(SLED_SCHED_POLICY, SLED_GPU_KV_BLOCKS, ...) reach every service."
        ),
    )
    p.add_argument(
        "--drafter",
        action="append",
        metavar="NAME=MODEL",
        help="a drafter device and its draft model (repeatable; replaces the default three: "
        "pi5-int4=smollm2-135m-int4, orin-int8=smollm2-135m-int8, phone-ngram=ngram)",
    )
    p.add_argument(
        "--without",
        dest="without",
        action="append",
        choices=_OPTIONAL,
        default=[],
        help="leave this server-side service out (repeatable; the verifier then plans locally "
        "or keeps every session on the accelerator)",
    )
    p.add_argument("--log-dir", type=Path, help="where service logs go (default: a new run dir)")
    p.add_argument("--ready-timeout", type=float, default=300.0, metavar="S")
    p.add_argument("--stop-timeout", type=float, default=15.0, metavar="S")
    p.set_defaults(func=_run)


def _parse_drafters(values: list[str] | None):
    from sled_shared.launcher import DEFAULT_DRAFTERS

    if not values:
        return DEFAULT_DRAFTERS
    out = []
    for value in values:
        name, sep, model = value.partition("=")
        if not sep or not name or not model:
            raise CliError(
                f"--drafter {value!r}: expected NAME=MODEL, e.g. pi5-int4=smollm2-135m-int4"
            )
        out.append((name, model))
    return tuple(out)


def _run(args: argparse.Namespace) -> int:
    import platformdirs

    from sled_shared.launcher import DEFAULT_SERVER, Launcher, default_stack

    server = tuple(s for s in DEFAULT_SERVER if s not in args.without)
    try:
        specs = default_stack(server, _parse_drafters(args.drafter))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    log_dir = args.log_dir or Path(platformdirs.user_log_dir("sled")) / time.strftime(
        "up-%Y%m%d-%H%M%S"
    )
    launcher = Launcher(
        specs,
        log_dir=log_dir,
        nats_url=os.environ.get("SLED_NATS_URL") or None,
        ready_timeout_s=args.ready_timeout,
        stop_timeout_s=args.stop_timeout,
    )
    return serve(launcher)


def serve(launcher, out: IO[str] | None = None) -> int:
    """Start ``launcher``, print its endpoints and `ready`, supervise until a
    signal (exit 0) or a dying service (CliError naming it)."""
    from sled_shared.launcher import Interrupted, LaunchError

    out = out or sys.stdout
    interrupt = launcher.interrupt
    previous = {
        sig: signal.signal(sig, lambda *_: interrupt.set())
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for ep in launcher.start():
            print(f"{ep.service:<12} {ep.kind:<8} {ep.url}", file=out)
        print(f"{'logs':<12} {'dir':<8} {launcher.log_dir}", file=out)
        print("ready", file=out, flush=True)
        while not interrupt.wait(0.5):
            launcher.check()
        return 0
    except Interrupted:
        print("interrupted", file=sys.stderr)
        return 130
    except LaunchError as exc:
        raise CliError(str(exc)) from None
    finally:
        launcher.stop()
        print("stopped", file=out, flush=True)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
