from __future__ import annotations

import msgpack
import numpy as np
import pytest
from sled_shared.protocol import (
    ErrorReply,
    ProtocolError,
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
    decode,
    encode,
)
from sled_shared.speculative import SamplingParams

SAMPLES = [
    SessionOpen(
        prompt_ids=[1, 2, 49151],
        max_new_tokens=64,
        draft_kind="smollm2-135m-int4",
        device_name="pi5-int4",
        params=SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=2**64 - 1),
        stream=12345678901234,
        stop_ids=[2],
    ),
    SessionOpen(prompt_ids=np.arange(5), max_new_tokens=1, draft_kind="ngram", device_name="p"),
    SessionOpened("s-1", "v-1", 17, finished=True, reason="length"),
    SessionOpened("s-1", "v-1", 0),
    VerifyRequest("s-1", 0, 3, np.array([5, 6], np.int32)),
    VerifyRequest("s-1", 4, 9, np.zeros(0, np.int32)),
    VerifyRequest("s-1", 5, 9, [], []),  # sampling with K=0
    VerifyRequest(
        "s-1",
        7,
        30,
        [5, 6, 7],
        [
            (np.array([5, 9], np.int32), np.array([0.75, 0.25])),
            (np.array([6], np.int32), np.array([1.0])),
            (np.array([1, 7, 3], np.int32), np.array([0.5, 0.25, 0.25])),
        ],
    ),
    VerifyResponse("s-1", 7, 2, 11, suggested_k=4, queue_s=0.002, compute_s=0.05, batch_size=3),
    VerifyResponse("s-1", 8, 0, 2, finished=True, reason="stop"),
    SessionClose("s-1"),
    SessionClosed("s-1"),
    ErrorReply("at_capacity", "64 sessions open", retry_after_s=1.5),
    ErrorReply("internal", "boom"),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    back = decode(encode(msg))
    assert type(back) is type(msg)
    assert back == msg


def test_round_trip_keeps_values_and_dtypes():
    msg = decode(encode(SAMPLES[0]))
    assert msg.prompt_ids.dtype == np.int32 and msg.prompt_ids.tolist() == [1, 2, 49151]
    assert msg.params == SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=2**64 - 1)
    assert msg.stream == 12345678901234 and msg.stop_ids.tolist() == [2]
    (sampled,) = [m for m in SAMPLES if isinstance(m, VerifyRequest) and len(m.draft_ids) == 3]
    dists = decode(encode(sampled)).draft_dists
    assert [d[0].tolist() for d in dists] == [[5, 9], [6], [1, 7, 3]]
    assert [d[1].tolist() for d in dists] == [[0.75, 0.25], [1.0], [0.5, 0.25, 0.25]]
    assert all(d[1].dtype == np.float64 for d in dists)
    f32 = VerifyRequest("s", 0, 1, [4], [([4, 5], np.array([0.5, 0.5], np.float32))])
    assert decode(encode(f32)).draft_dists[0][1].dtype == np.float32


def test_arrays_are_packed_compactly():
    prompt = np.arange(30000, 31000, dtype=np.int64)  # big ids: 5 bytes each as msgpack ints
    raw = encode(SessionOpen(prompt, 8, "ngram", "dev"))
    assert len(raw) < 4000 + 200  # 4 bytes per token plus the rest of the message
    assert decode(raw).prompt_ids.tolist() == prompt.tolist()


def _raw(body: dict) -> bytes:
    return msgpack.packb(body, use_bin_type=True)


def test_unknown_version_is_unsupported_version():
    body = msgpack.unpackb(encode(SessionClose("s")))
    body["v"] = 2
    with pytest.raises(ProtocolError) as err:
        decode(_raw(body))
    assert err.value.code == "unsupported_version"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1garbage",
        _raw([1, 2, 3]),
        _raw({"t": "session.close", "session_id": "s"}),  # no version
        _raw({"v": True, "t": "session.close", "session_id": "s"}),
        _raw({"v": 1, "t": "nope", "session_id": "s"}),
        _raw({"v": 1, "t": "session.close"}),  # missing field
        _raw({"v": 1, "t": "session.close", "session_id": "s", "extra": 1}),
        _raw({"v": 1, "t": "session.close", "session_id": 5}),  # wrong type
        _raw({"v": 1, "t": "verify.request", "session_id": "s", "round": "1",
              "committed_len": 1, "draft_ids": msgpack.ExtType(1, b"")}),
        _raw({"v": 1, "t": "verify.request", "session_id": "s", "round": 1,
              "committed_len": 1, "draft_ids": msgpack.ExtType(1, b"\x01\x00")}),  # truncated
        _raw({"v": 1, "t": "verify.request", "session_id": "s", "round": 1,
              "committed_len": 1, "draft_ids": msgpack.ExtType(9, b"")}),  # unknown ext
        _raw({"v": 1, "t": "session.open", "prompt_ids": msgpack.ExtType(1, b"\x01\0\0\0"),
              "max_new_tokens": 4, "draft_kind": "x", "device_name": "d",
              "params": {"temperature": -1.0}}),
        _raw({"v": 1, "t": "session.open", "prompt_ids": msgpack.ExtType(1, b"\x01\0\0\0"),
              "max_new_tokens": 4, "draft_kind": "x", "device_name": "d",
              "params": {"warmth": 1.0}}),
        _raw({"v": 1, "t": "error", "code": "oops", "message": ""}),
    ],
)  # fmt: skip
def test_malformed_is_bad_request(data):
    with pytest.raises(ProtocolError) as err:
        decode(data)
    assert err.value.code == "bad_request"


def test_list_ids_from_other_clients_are_accepted():
    # A client in another language may send plain msgpack ints; they are still checked.
    body = {"v": 1, "t": "verify.request", "session_id": "s", "round": 1, "committed_len": 1}
    msg = decode(_raw({**body, "draft_ids": [3, 4]}))
    assert msg.draft_ids.dtype == np.int32 and msg.draft_ids.tolist() == [3, 4]
    with pytest.raises(ProtocolError):
        decode(_raw({**body, "draft_ids": [3, -4]}))
    with pytest.raises(ProtocolError):
        decode(_raw({**body, "draft_ids": [3, 2**40]}))


def test_expect_rejects_other_types():
    with pytest.raises(ProtocolError, match=r"expected a verify\.request"):
        decode(encode(SessionClose("s")), VerifyRequest)
    assert decode(encode(SessionClose("s")), (VerifyRequest, SessionClose)) == SessionClose("s")


@pytest.mark.parametrize(
    "make",
    [
        lambda: SessionOpen([], 4, "ngram", "d"),
        lambda: SessionOpen([1], 0, "ngram", "d"),
        lambda: SessionOpen([1], 4, "", "d"),
        lambda: SessionOpen([1], 4, "ngram", "d", stream=-1),
        lambda: SessionOpened("s", "v", 3, finished=True),
        lambda: SessionOpened("s", "v", 3, reason="stop"),
        lambda: SessionOpened("s", "v", 3, finished=True, reason="tired"),
        lambda: VerifyRequest("s", 0, 0, [1]),
        lambda: VerifyRequest("s", -1, 1, [1]),
        lambda: VerifyRequest("s", 0, 1, [[1, 2]]),
        lambda: VerifyRequest("s", 0, 1, [1.5]),
        lambda: VerifyRequest("s", 0, 1, [1, 2], [([1], [1.0])]),  # one dist per token
        lambda: VerifyRequest("s", 0, 1, [1], [([1, 2], [0.5])]),  # ids/probs lengths
        lambda: VerifyRequest("s", 0, 1, [1], [([1, 2], [0.5, 0.4])]),  # sum != 1
        lambda: VerifyRequest("s", 0, 1, [1], [([1, 2], [0.0, 1.0])]),  # draft has q=0
        lambda: VerifyRequest("s", 0, 1, [1], [([1], [float("nan")])]),
        lambda: VerifyResponse("s", 0, 1, 2, queue_s=-1.0),
        lambda: VerifyResponse("s", 0, True, 2),
        lambda: ErrorReply("nope", "x"),
        lambda: ErrorReply("internal", "x", retry_after_s=float("inf")),
    ],
)
def test_invalid_fields_are_rejected_locally(make):
    with pytest.raises(ProtocolError):
        make()


def test_numpy_scalars_are_normalised():
    msg = VerifyResponse("s", np.int64(3), np.int32(1), np.int64(7), queue_s=np.float32(0.5))
    assert type(msg.round) is int and type(msg.queue_s) is float
    assert decode(encode(msg)) == msg
