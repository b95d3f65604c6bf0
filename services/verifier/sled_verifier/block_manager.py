"""Paged KV bookkeeping: a free list of fixed-size blocks and one block table per session."""

from __future__ import annotations


class OutOfBlocksError(RuntimeError):
    """The KV budget cannot hold the requested tokens; nothing was allocated."""


class BlockManager:
    """Owns which KV block belongs to which session; holds no tensors.

    A session holding `n` tokens owns exactly ceil(n / block_size) blocks, so a
    rollback to a shorter length returns every block past the new end at once.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(
                f"need positive num_blocks and block_size, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks are reused first while still warm in cache.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[str, list[int]] = {}
        self._lengths: dict[str, int] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def __contains__(self, session: str) -> bool:
        return session in self._tables

    def add(self, session: str) -> None:
        if session in self._tables:
            raise ValueError(f"session {session!r} already has a block table")
        self._tables[session] = []
        self._lengths[session] = 0

    def length(self, session: str) -> int:
        return self._lengths[self._known(session)]

    def block_table(self, session: str) -> list[int]:
        return self._tables[self._known(session)]

    def blocks_needed(self, session: str, n_new: int) -> int:
        """Blocks beyond those the session owns that `n_new` more tokens would take."""
        total = self._blocks_for(self.length(session) + n_new)
        return max(0, total - len(self._tables[session]))

    def allocate(self, session: str, n_new: int) -> None:
        """Grow the session by `n_new` tokens; all or nothing."""
        if n_new < 0:
            raise ValueError(f"cannot allocate {n_new} tokens")
        need = self.blocks_needed(session, n_new)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"KV cache full: {need} more blocks needed, {len(self._free)} of "
                f"{self.num_blocks} free"
            )
        table = self._tables[session]
        for _ in range(need):
            table.append(self._free.pop())
        self._lengths[session] += n_new

    def truncate(self, session: str, new_len: int) -> None:
        """Drop tokens past `new_len` and return the blocks they alone occupied."""
        length = self.length(session)
        if not 0 <= new_len <= length:
            raise ValueError(f"cannot truncate session of {length} tokens to {new_len}")
        table = self._tables[session]
        keep = self._blocks_for(new_len)
        while len(table) > keep:
            self._free.append(table.pop())
        self._lengths[session] = new_len

    def free(self, session: str) -> None:
        """Release all of a session's blocks; unknown sessions are ignored."""
        table = self._tables.pop(session, None)
        self._lengths.pop(session, None)
        if table:
            self._free.extend(reversed(table))

    def _blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def _known(self, session: str) -> str:
        if session not in self._tables:
            raise KeyError(f"session {session!r} has no block table")
        return session
