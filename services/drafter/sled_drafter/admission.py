"""How many generations a device runs at once, and how many may wait.

A device's draft thread and memory (a draft model's KV cache per session)
are small; beyond ``max_active`` generations a request waits, at most
``max_waiting`` of them for at most ``wait_s``, first come first served, and
is then refused with a Retry-After, never queued without bound.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from sled_drafter.errors import Overloaded, Unavailable

RETRY_AFTER_S = 1.0


@dataclass(slots=True)
class Admission:
    max_active: int
    max_waiting: int
    wait_s: float
    active: int = 0
    draining: bool = False
    # A freed slot passes straight to the oldest waiter (result True); drain() wakes
    # every waiter with False.
    _waiters: deque[asyncio.Future[bool]] = field(default_factory=deque)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        if self.max_active < 1 or self.max_waiting < 0 or self.wait_s < 0:
            raise ValueError("need max_active >= 1, max_waiting >= 0 and wait_s >= 0")
        self._idle.set()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.draining:
            raise Unavailable("this device is shutting down", retry_after_s=RETRY_AFTER_S)
        if self.active < self.max_active and not self._waiters:
            self.active += 1
            self._idle.clear()
            return
        if len(self._waiters) >= self.max_waiting:
            raise Overloaded(
                f"{self.active} generations running and {self.waiting} waiting on this device",
                retry_after_s=RETRY_AFTER_S,
            )
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            async with asyncio.timeout(self.wait_s):
                granted = await turn
        except TimeoutError:
            raise Overloaded(
                f"no generation slot freed within {self.wait_s:g}s", retry_after_s=RETRY_AFTER_S
            ) from None
        except BaseException:
            # Cancelled just as a slot was handed over: pass the slot on.
            if turn.done() and not turn.cancelled() and turn.result():
                self.release()
            raise
        finally:
            if turn in self._waiters:
                self._waiters.remove(turn)
        if not granted:
            raise Unavailable("this device is shutting down", retry_after_s=RETRY_AFTER_S)

    def release(self) -> None:
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():  # a waiter that timed out is cancelled
                turn.set_result(True)
                return
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Refuse new generations and wait for the running ones; True when all ended."""
        self.draining = True
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(False)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
