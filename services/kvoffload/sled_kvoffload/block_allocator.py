"""Free list of the host KV store's blocks.

The allocator tries to keep each session's blocks contiguous: the CPU
attention kernel multiplies one contiguous run of blocks with a single BLAS
call, so fewer runs means fewer calls and longer streaming reads. A session
grows into the block right after its last one while that is free; otherwise
its next run starts in the middle of the largest free gap, which leaves room
on both sides for the sessions around it to grow.
"""

from __future__ import annotations

import numpy as np


class OutOfBlocksError(RuntimeError):
    """The host KV store has fewer free blocks than a request needs."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self._free = np.ones(num_blocks, dtype=bool)  # [num_blocks]: True = free
        self._num_free = num_blocks

    @property
    def num_blocks(self) -> int:
        return self._free.size

    @property
    def num_free(self) -> int:
        return self._num_free

    def allocate(self, count: int, after: int | None = None, who: str = "") -> list[int]:
        """Take ``count`` blocks; ``after`` is the caller's current last block.

        All or nothing: raises ``OutOfBlocksError`` before taking any block.
        """
        if count < 0:
            raise ValueError(f"block count must be >= 0, got {count}")
        if count > self._num_free:
            owner = f" for session {who!r}" if who else ""
            raise OutOfBlocksError(
                f"host KV store out of blocks{owner}: need {count}, "
                f"{self._num_free} free of {self.num_blocks}"
            )
        taken: list[int] = []
        nxt = None if after is None else after + 1
        while len(taken) < count:
            if nxt is None or nxt >= self.num_blocks or not self._free[nxt]:
                nxt = self._new_run_start(count - len(taken))
            end = nxt
            while end < self.num_blocks and self._free[end] and end - nxt < count - len(taken):
                end += 1
            self._free[nxt:end] = False
            taken.extend(range(nxt, end))
            nxt = end
        self._num_free -= count
        return taken

    def release(self, blocks: list[int]) -> None:
        if not blocks:
            return
        idx = np.asarray(blocks, dtype=np.int64)
        if idx.min() < 0 or idx.max() >= self.num_blocks:
            raise ValueError(f"block id out of range [0, {self.num_blocks})")
        if np.unique(idx).size != idx.size or self._free[idx].any():
            raise ValueError("releasing a block that is already free (double free)")
        self._free[idx] = True
        self._num_free += idx.size

    def _new_run_start(self, want: int) -> int:
        # Runs of free blocks from the edges of the free mask.
        edges = np.diff(np.concatenate(([0], self._free.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1)
        ends = np.flatnonzero(edges == -1)
        lengths = ends - starts
        best = int(np.argmax(lengths))
        slack = max(0, int(lengths[best]) - want)
        return int(starts[best]) + slack // 2
