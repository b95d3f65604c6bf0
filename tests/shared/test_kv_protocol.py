"""Round trips and field checks of the KV-offload wire messages."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
from sled_shared.kv_migrate_protocol import (
    KVChunk,
    KVExport,
    KVImportBegin,
    KVImportEnd,
    KVMigrateAck,
)
from sled_shared.kv_protocol import (
    KVAppend,
    KVAppended,
    KVAttend,
    KVAttended,
    KVEvict,
    KVEvicted,
    KVGeometry,
    KVLoad,
    KVOpen,
    KVOpened,
    KVStats,
    KVTruncate,
    KVTruncated,
)
from sled_shared.protocol import ProtocolError, decode, encode, message

G = KVGeometry(num_layers=30, q_heads=9, kv_heads=3, head_dim=64)
RNG = np.random.default_rng(0)


def _f32(n: int) -> np.ndarray:
    return RNG.standard_normal(n).astype(np.float32)


def _attend(**over) -> KVAttend:
    fields = dict(
        forward_id=7, layer=3, sessions=("a", "b"), start_pos=[200, 17], new_lens=[5, 1],
        kv_heads=3, head_dim=64, keys=_f32(6 * 192), values=_f32(6 * 192), q_heads=9,
        q=_f32(6 * 576),
    )  # fmt: skip
    return KVAttend(**{**fields, **over})


SAMPLES = [
    KVOpen("s-1", G),
    KVOpen("s-1", dataclasses.replace(G, scale=0.125)),
    KVOpened("s-1", 0, 4096),
    _attend(),
    KVAttended(7, 3, _f32(6 * 576), compute_s=0.001, queue_s=0.0002, appended=False),
    KVAppend(0, 0, ("a",), [0], [40], 3, 64, _f32(40 * 192), _f32(40 * 192)),
    KVAppended(0, 0, np.array([40], np.int32)),
    KVTruncate(("a", "b"), [202, 17]),
    KVTruncated(("a", "b"), [202, 17]),
    KVEvict("a"),
    KVEvicted("a", True, 512),
    KVStats(),
    KVLoad("w1", 2, 16, 30, 994, 30 * 16 * 1536 * 30, 1024 * 16 * 1536 * 30, 12, 0.05),
    KVExport("a", 3, 768 * 1024),
    KVImportBegin("a", G, 201),
    KVChunk("a", 3, 9, 1, 100, 201, 3, 64, _f32(50 * 192), _f32(50 * 192)),
    KVImportEnd("a", abort=True),
    KVMigrateAck("a", 201, 0.5, False),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    back = decode(encode(msg))
    assert type(back) is type(msg) and back == msg


def test_attend_arrays_travel_packed_and_split_per_session():
    msg = _attend()
    wire = encode(msg)
    # q/k/v dominate: 4 bytes per value plus a small envelope.
    assert len(wire) < 4 * (msg.q.size + 2 * msg.keys.size) + 300
    back = decode(wire)
    q = back.per_session(back.q, back.q_heads)
    assert [x.shape for x in q] == [(5, 9, 64), (1, 9, 64)]
    np.testing.assert_array_equal(q[1].ravel(), msg.q[5 * 576 :])
    assert back.tokens == 6 and back.offsets.tolist() == [0, 5, 6]


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"keys": _f32(5)}, "keys holds 5 values, expected 1152"),
        ({"q": _f32(6 * 576 - 1)}, "q holds"),
        ({"sessions": ("a", "a")}, "must not repeat"),
        ({"sessions": ()}, "non-empty list"),
        ({"new_lens": [5, 0]}, r"new_lens must hold values in \[1"),
        ({"start_pos": [1]}, "start_pos must be 2 integers"),
        ({"q_heads": 8}, "not a multiple of kv_heads"),
        ({"forward_id": -1}, "forward_id"),
        ({"values": np.full(1152, np.nan, np.float32)}, "non-finite"),
        ({"keys": np.zeros(1152, np.int32)}, "must be a float array"),
    ],
)
def test_invalid_batches_are_rejected(over, match):
    with pytest.raises(ProtocolError, match=match):
        _attend(**over)


def test_invalid_fields_from_the_wire_are_bad_request():
    good = msgpack.unpackb(
        encode(_attend()), raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d)
    )
    for key, value in (("layer", "x"), ("sessions", "ab"), ("extra", 1)):
        body = {**good, key: value}
        with pytest.raises(ProtocolError) as err:
            decode(msgpack.packb(body, use_bin_type=True))
        assert err.value.code == "bad_request"
    with pytest.raises(ProtocolError, match="geometry"):
        decode(encode(KVOpen("s", G)).replace(b"q_heads", b"x_heads"))
    with pytest.raises(ProtocolError, match="exceed total_len"):
        KVChunk("a", 0, 1, 0, 190, 200, 3, 64, _f32(20 * 192), _f32(20 * 192))
    with pytest.raises(ProtocolError, match="not a multiple"):
        KVChunk("a", 0, 1, 0, 0, 200, 3, 64, _f32(100), _f32(100))


def test_envelope_keys_cannot_be_field_names():
    with pytest.raises(ValueError, match="reserved field names"):

        @message("test.reserved")
        @dataclasses.dataclass(frozen=True, slots=True, eq=False)
        class Bad(KVStats):
            v: int = 0
