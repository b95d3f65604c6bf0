"""BlockManager: allocation, rollback, freeing, exhaustion."""

from __future__ import annotations

import pytest
from sled_verifier.block_manager import BlockManager, OutOfBlocksError


def test_allocate_grows_by_whole_blocks_only_when_needed():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.add("a")
    bm.allocate("a", 3)
    assert len(bm.block_table("a")) == 1 and bm.length("a") == 3
    bm.allocate("a", 1)  # fills the first block exactly
    assert len(bm.block_table("a")) == 1
    bm.allocate("a", 1)
    assert len(bm.block_table("a")) == 2 and bm.length("a") == 5
    assert bm.num_used == 2 and bm.num_free == 6


def test_sessions_never_share_blocks():
    bm = BlockManager(num_blocks=10, block_size=2)
    for sid, n in (("a", 5), ("b", 7), ("c", 1)):
        bm.add(sid)
        bm.allocate(sid, n)
    tables = [bm.block_table(s) for s in "abc"]
    flat = [b for t in tables for b in t]
    assert len(flat) == len(set(flat)) == 3 + 4 + 1


def test_truncate_frees_whole_blocks_past_the_new_length():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.add("a")
    bm.allocate("a", 13)  # 4 blocks
    kept = bm.block_table("a")[:2]
    bm.truncate("a", 5)  # 2 blocks hold 5 tokens
    assert bm.block_table("a") == kept and bm.length("a") == 5 and bm.num_free == 6
    bm.truncate("a", 4)  # exactly one block
    assert len(bm.block_table("a")) == 1
    bm.truncate("a", 4)  # no-op
    assert bm.length("a") == 4
    with pytest.raises(ValueError):
        bm.truncate("a", 5)  # cannot grow by truncation
    with pytest.raises(ValueError):
        bm.truncate("a", -1)


def test_out_of_blocks_allocates_nothing():
    bm = BlockManager(num_blocks=3, block_size=4)
    bm.add("a")
    bm.add("b")
    bm.allocate("a", 8)
    bm.allocate("b", 2)
    with pytest.raises(OutOfBlocksError, match="KV cache full"):
        bm.allocate("b", 7)  # would need 2 more, 0 free
    assert bm.length("b") == 2 and len(bm.block_table("b")) == 1 and bm.num_free == 0
    bm.allocate("b", 2)  # still fits in its own block
    assert bm.length("b") == 4


def test_free_returns_everything_and_is_idempotent():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.add("a")
    bm.allocate("a", 16)
    bm.free("a")
    bm.free("a")
    assert bm.num_free == 4 and "a" not in bm
    bm.add("b")
    bm.allocate("b", 16)  # all blocks usable again
    assert sorted(bm.block_table("b")) == [0, 1, 2, 3]


def test_bad_use_is_reported():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    bm = BlockManager(num_blocks=2, block_size=4)
    with pytest.raises(KeyError, match="no block table"):
        bm.allocate("ghost", 1)
    bm.add("a")
    with pytest.raises(ValueError, match="already"):
        bm.add("a")
    with pytest.raises(ValueError):
        bm.allocate("a", -1)
