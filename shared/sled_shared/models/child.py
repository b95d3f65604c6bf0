"""Run a pipeline tool (pip, the ONNX builder) as a child process with its output in a log."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Without this a killed prepare run would leave the builder running, writing
    # into a temp dir the next run deletes.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def run_logged(cmd: Sequence[str], log_path: Path, timeout_s: float) -> int:
    """Run `cmd`, stdout and stderr into `log_path`; its exit code.

    Raises subprocess.TimeoutExpired (after killing it) past `timeout_s`.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log:
        proc = subprocess.run(
            list(cmd),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    return proc.returncode
