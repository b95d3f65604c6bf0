"""Where each session's KV lives, and moving it between tiers.

Tiers (as in ``sled_shared.apex.plan``): ``ACCEL`` (the engine's paged
cache: the accelerator's KV budget), a kvoffload worker id (host RAM; the
session's attention is delegated to that worker), or ``RECOMPUTE`` (no KV
anywhere; a prefill of the committed tokens rebuilds it when the session
comes back). The engine asks this class, not the block manager, for room,
block tables, rollbacks and frees, so the rest of it does not care where a
session lives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from sled_shared.apex.plan import ACCEL, RECOMPUTE

from .attention import AttentionRouter
from .block_manager import BlockManager, OutOfBlocksError
from .host_tier import HostTier, HostTierError
from .kv_cache import KVCache


class TieredKV:
    def __init__(self, blocks: BlockManager, cache: KVCache, router: AttentionRouter) -> None:
        self.blocks = blocks
        self.cache = cache
        self.router = router
        self.host: HostTier | None = None
        self.offload_new = False  # open sessions the budget cannot hold on the host tier
        self._tier: dict[str, str] = {}
        self.opened: dict[str, float] = {}  # session -> when it arrived (newest leave first)

    def attach(self, host: HostTier, offload_new: bool) -> None:
        """Use kvoffload workers: for parking (swap) always, for new sessions if `offload_new`."""
        self.host = host
        self.offload_new = offload_new

    def open_tier(self, tokens: int) -> str:
        """Where a new session holding `tokens` goes: the accelerator while it fits."""
        fits = -(-tokens // self.blocks.block_size) <= self.blocks.num_free
        if fits or self.host is None or not self.offload_new:
            return ACCEL
        return self.host.pick(tokens) or ACCEL

    def tier(self, session: str) -> str:
        return self._tier.get(session, ACCEL)

    def on_host(self, session: str) -> bool:
        return self.tier(session) not in (ACCEL, RECOMPUTE)

    # ------------------------------------------------------- engine bookkeeping

    def add(self, session: str, tier: str = ACCEL) -> None:
        self._place(session, tier)
        self.opened[session] = time.monotonic()

    def allocate(self, session: str, n_new: int) -> None:
        tier = self.tier(session)
        if tier == ACCEL:
            self.blocks.allocate(session, n_new)
        elif tier == RECOMPUTE:
            raise OutOfBlocksError(f"session {session} has no KV until it is rebuilt")
        else:
            self._host().grow(session, n_new)

    def block_table(self, session: str) -> list[int] | None:
        """The accelerator block table; None for a session whose attention runs elsewhere."""
        return self.blocks.block_table(session) if self.tier(session) == ACCEL else None

    def length(self, session: str) -> int:
        tier = self.tier(session)
        if tier == ACCEL:
            return self.blocks.length(session)
        return 0 if tier == RECOMPUTE else self._host().lengths[session]

    def truncate(self, session: str, new_len: int) -> None:
        tier = self.tier(session)
        if tier == ACCEL:
            self.blocks.truncate(session, new_len)
        elif tier != RECOMPUTE:
            self._host().truncate(session, new_len)

    def free(self, session: str) -> None:
        self._drop(session)
        self._tier.pop(session, None)
        self.opened.pop(session, None)

    def flush(self) -> dict[str, str]:
        """Send queued host rollbacks; sessions whose worker failed them (or their
        attention), with the reason."""
        if self.host is None:
            return {}
        self.host.flush()
        return self.host.take_failures()

    # --------------------------------------------------------------- migration

    def move(self, session: str, dst: str, rebuild: Callable[[str], None]) -> None:
        """Move a session's KV to `dst`; HostTierError or OutOfBlocksError if it cannot.

        A failure before the KV left its tier leaves the session where it was;
        once the source copy is gone, the session falls back to RECOMPUTE (its
        committed tokens rebuild it later), so nothing is ever lost.
        """
        src = self.tier(session)
        if src == dst:
            return
        if dst == RECOMPUTE:
            self._drop(session)
            self._tier[session] = RECOMPUTE
            return
        if src == RECOMPUTE:
            self._place(session, dst)
            try:
                rebuild(session)
            except BaseException:
                self._drop(session)
                self._tier[session] = RECOMPUTE
                raise
            return
        if src == ACCEL:
            k, v = self._read_local(session)
            self._host().import_kv(session, dst, k, v)
            self.blocks.free(session)
        elif dst == ACCEL:
            k, v = self._host().export_kv(session)
            self._write_local(session, k, v)  # the worker's copy stays until this succeeds
            self._host().evict(session)
        else:
            k, v = self._host().export_kv(session)
            self._drop(session)
            self._tier[session] = RECOMPUTE  # until the KV has landed at dst
            self._host().import_kv(session, dst, k, v)
        self._tier[session] = dst
        self.router.delegate(session, None if dst == ACCEL else self._host().executors[dst])

    # ------------------------------------------------------------------ helpers

    def _host(self) -> HostTier:
        if self.host is None:
            raise HostTierError("no kvoffload workers are attached")
        return self.host

    def _place(self, session: str, tier: str) -> None:
        if tier == ACCEL:
            self.blocks.add(session)
        elif tier != RECOMPUTE:
            self.router.delegate(session, self._host().open(session, tier))
        self._tier[session] = tier

    def _drop(self, session: str) -> None:
        self.blocks.free(session)
        if self.host is not None and session in self.host.where:
            self.host.evict(session)
        self.router.forget(session)

    def _read_local(self, session: str) -> tuple[np.ndarray, np.ndarray]:
        n = self.blocks.length(session)
        table = torch.tensor(self.blocks.block_table(session), dtype=torch.int64)
        table = table.to(self.cache.data.device)
        layers = [self.cache.gather(i, table, n) for i in range(self.cache.data.shape[0])]
        ks, vs = [k for k, _ in layers], [v for _, v in layers]

        def host(x: list[torch.Tensor]) -> np.ndarray:
            return torch.stack(x).to("cpu", torch.float32).numpy()

        return host(ks), host(vs)

    def _write_local(self, session: str, k: np.ndarray, v: np.ndarray) -> None:
        n = k.shape[1]
        self.blocks.add(session)
        try:
            self.blocks.allocate(session, n)
        except OutOfBlocksError:
            self.blocks.free(session)
            raise
        bs = self.blocks.block_size
        table = torch.tensor(self.blocks.block_table(session), dtype=torch.int64)
        pos = torch.arange(n)
        dev, dtype = self.cache.data.device, self.cache.data.dtype
        slots = (table[pos // bs] * bs + pos % bs).to(dev)
        kt = torch.from_numpy(k).to(dev, dtype)
        vt = torch.from_numpy(v).to(dev, dtype)
        for layer in range(kt.shape[0]):
            self.cache.write(layer, slots, kt[layer], vt[layer])
