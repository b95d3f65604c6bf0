"""Progress of `sled models prepare`: a step bar and one line per finished step."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class StepResult:
    name: str
    path: Path
    cached: bool
    seconds: float
    size_bytes: int

    def __post_init__(self) -> None:
        if self.seconds < 0 or self.size_bytes < 0:
            raise ValueError(f"step {self.name}: negative time or size")


class StepProgress:
    """A tqdm step bar plus one line per finished step; plain lines without tqdm."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.done = total, enabled, 0
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc="sled models prepare", unit="step", file=sys.stderr)

    def start(self, name: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def finish(self, result: StepResult, note: str) -> None:
        self.done += 1
        line = (
            f"[{self.done}/{self.total}] {result.name:<24} {note:<10} {result.seconds:7.1f}s "
            f"{result.size_bytes / 1e6:9.1f} MB  {result.path}"
        )
        if self.bar is not None:
            self.bar.write(line)
            self.bar.update(1)
        elif self.enabled:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
