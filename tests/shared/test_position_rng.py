"""position_rng is Philox4x64-10 as specified (Salmon et al., SC'11), so any host draws
the same numbers for the same (seed, stream, position, purpose): a failover to another
verifier, or a drafter on another architecture, reproduces the run exactly."""

from __future__ import annotations

import numpy as np
import pytest
from sled_shared.speculative import Purpose, position_rng

MASK = (1 << 64) - 1


def philox4x64_10(counter: list[int], key: list[int]) -> list[int]:
    """Reference Philox4x64 with 10 rounds, written from the paper's definition."""
    c, k = list(counter), list(key)
    for r in range(10):
        if r:
            k = [(k[0] + 0x9E3779B97F4A7C15) & MASK, (k[1] + 0xBB67AE8584CAA73B) & MASK]
        p0 = 0xD2E7470EE14C6C93 * c[0]
        p1 = 0xCA5A826395121157 * c[2]
        c = [(p1 >> 64) ^ c[1] ^ k[0], p1 & MASK, (p0 >> 64) ^ c[3] ^ k[1], p0 & MASK]
    return c


def test_reference_matches_random123_known_answers() -> None:
    assert philox4x64_10([0, 0, 0, 0], [0, 0]) == [
        0x16554D9ECA36314C,
        0xDB20FE9D672D0FDC,
        0xD7E772CEE186176B,
        0x7E68B68AEC7BA23B,
    ]
    assert philox4x64_10([MASK] * 4, [MASK] * 2) == [
        0x87B092C3013FE90B,
        0x438C3C67BE8D0224,
        0x9CC7D7C69CD777B6,
        0xA09CAEBF594F0BA0,
    ]


@pytest.mark.parametrize(
    ("seed", "stream", "position", "purpose"),
    [
        (0, 0, 0, Purpose.DRAFT),
        (123, 456, 789, Purpose.ACCEPT),
        (MASK, MASK, MASK, Purpose.RESAMPLE),
        (2**63 + 5, 7, 1 << 40, Purpose.FIRST),
    ],
)
def test_draws_follow_the_documented_key_layout(
    seed: int, stream: int, position: int, purpose: Purpose
) -> None:
    # Key (seed, stream); counter (block, 0, position, purpose) with the block
    # starting at 1 because the generator increments before each block.
    expected = []
    for block in (1, 2):
        expected += philox4x64_10([block, 0, position, int(purpose)], [seed, stream])
    raw = position_rng(seed, stream, position, purpose).bit_generator.random_raw(8)
    assert [int(v) for v in raw] == expected
    # random() is the top 53 bits of the first word, scaled to [0, 1).
    u = position_rng(seed, stream, position, purpose).random()
    assert u == (expected[0] >> 11) * 2.0**-53


def test_accepts_numpy_integers() -> None:
    a = position_rng(np.uint64(5), np.int64(6), np.int32(7), Purpose.DRAFT).random()
    assert a == position_rng(5, 6, 7, Purpose.DRAFT).random()
