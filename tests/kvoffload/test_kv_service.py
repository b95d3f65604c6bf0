"""The kvoffload service over a real nats-server: attend, retries, truncate, evict, errors."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from sled_kvoffload.cpu_attention import AttendRequest, CpuAttention
from sled_kvoffload.host_cache import CacheConfig, HostKVCache
from sled_shared import bus, subjects
from sled_shared.kv_client import KVClient, SessionTokens
from sled_shared.kv_protocol import (
    KVAttend,
    KVAttended,
    KVEvict,
    KVGeometry,
    KVLoad,
    KVStats,
)
from sled_shared.protocol import ErrorReply, decode, encode

from .conftest import SMOL, client, rand, reference, worker

TOL = {"rtol": 2e-4, "atol": 2e-5}  # fp32 kernel vs fp64 reference


def _attend_msg(forward_id, layer, toks: list[SessionTokens]) -> KVAttend:
    return KVAttend(
        forward_id, layer, tuple(t.session for t in toks),
        np.array([t.start_pos for t in toks], np.int32),
        np.array([t.k.shape[0] for t in toks], np.int32), SMOL.kv_heads, SMOL.head_dim,
        np.concatenate([t.k.ravel() for t in toks]), np.concatenate([t.v.ravel() for t in toks]),
        SMOL.q_heads, np.concatenate([t.q.ravel() for t in toks]),
    )  # fmt: skip


def _new(rng, session: str, start: int, n: int, g: KVGeometry = SMOL) -> SessionTokens:
    return SessionTokens(
        session, start, rand(rng, n, g.kv_heads, g.head_dim), rand(rng, n, g.kv_heads, g.head_dim),
        rand(rng, n, g.q_heads, g.head_dim) * 2,
    )  # fmt: skip


async def _prefill(kv: KVClient, rng, contexts: dict[str, int], g: KVGeometry = SMOL):
    """Open and fill each session; returns {(session, layer): (k, v)} it stored."""
    history = {}
    for s in contexts:
        assert (await kv.open(s, g)).length == 0
    for layer in range(g.num_layers):
        batch = [_new(rng, s, 0, n, g) for s, n in contexts.items()]
        lengths = await kv.append(0, layer, batch)
        assert lengths == contexts
        history.update({(t.session, layer): (t.k, t.v) for t in batch})
    return history


async def test_attend_over_nats_matches_library_and_fp64_reference(nats_url):
    rng = np.random.default_rng(0)
    contexts = {"a": 37, "b": 80, "c": 1, "d": 200}
    new = {"a": 5, "b": 1, "c": 3, "d": 5}
    twin = HostKVCache(CacheConfig(SMOL.num_layers, SMOL.kv_heads, SMOL.head_dim, 512, 16))
    async with worker(nats_url) as svc, client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        history = await _prefill(kv, rng, contexts)
        for (s, layer), (k, v) in history.items():
            twin.append(s, layer, k, v)
        with CpuAttention(twin, SMOL.q_heads, threads=2) as lib:
            for layer in range(SMOL.num_layers):
                batch = [_new(rng, s, contexts[s], n) for s, n in new.items()]
                res = await kv.attend(1, layer, batch)
                want_lib = lib.attend(
                    layer, [AttendRequest(t.session, t.q, t.k, t.v) for t in batch]
                )
                assert res.compute_s > 0 and res.queue_s >= 0
                for t, got, lib_out in zip(batch, res.outputs, want_lib, strict=True):
                    k0, v0 = history[t.session, layer]
                    want = reference(t.q, np.concatenate([k0, t.k]), np.concatenate([v0, t.v]))
                    assert got.shape == t.q.shape and got.dtype == np.float32
                    np.testing.assert_allclose(got, lib_out, rtol=1e-6, atol=1e-6)
                    np.testing.assert_allclose(got, want, **TOL)
        load = await kv.stats()
        assert load.sessions == 4 and load.worker_id == "w1"
        # Blocks of 16 tokens: 42 -> 3, 81 -> 6, 4 -> 1, 205 -> 13.
        assert load.used_blocks == 23 and load == svc.load


async def test_retried_attend_does_not_append_twice(nats_url):
    rng = np.random.default_rng(1)
    async with worker(nats_url) as svc, client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        history = await _prefill(kv, rng, {"s": 20, "t": 7})
        batch = [_new(rng, "s", 20, 5), _new(rng, "t", 7, 2)]
        msg = _attend_msg(1, 0, batch)
        # First attempt: the worker appends, but its reply is lost (nobody listens).
        await nc.publish(subjects.kv("w1", "attend"), encode(msg), reply="_INBOX.lost")
        for _ in range(200):
            if svc.worker.attend_requests == 1:
                break
            await asyncio.sleep(0.05)
        assert svc.worker.attend_requests == 1
        # The retry is answered from the stored tokens, without appending again.
        res = await kv.attend(1, 0, batch)
        raw = await bus.request(nc, subjects.kv("w1", "attend"), msg, 10, expect=KVAttended)
        assert raw.appended is False
        for t, got in zip(batch, res.outputs, strict=True):
            k0, v0 = history[t.session, 0]
            want = reference(t.q, np.concatenate([k0, t.k]), np.concatenate([v0, t.v]))
            np.testing.assert_allclose(got, want, **TOL)
        assert (await kv.open("s", SMOL)).length == 25
        assert svc.worker._cache.length("s", 0) == 25 and svc.worker._cache.length("t", 0) == 9
        # The next layer, then a late retry of layer 0: still no double append.
        await kv.attend(1, 1, [_new(rng, "s", 20, 5)])
        again = await bus.request(nc, subjects.kv("w1", "attend"), msg, 10, expect=KVAttended)
        np.testing.assert_array_equal(again.out, raw.out)
        assert svc.worker._cache.length("s", 0) == 25
        # A new forward at a stale position, or a "retry" of another range: refused, unchanged.
        for bad in (_attend_msg(2, 0, batch), _attend_msg(1, 0, [_new(rng, "s", 20, 4)])):
            with pytest.raises(bus.RemoteError) as err:
                await bus.request(nc, subjects.kv("w1", "attend"), bad, 10, expect=KVAttended)
            assert err.value.code == "bad_request" and "holds 25 tokens" in str(err.value)
        assert svc.worker._cache.length("s", 0) == 25 and svc.worker._cache.length("t", 0) == 9


async def test_truncate_rolls_back_rejected_drafts(nats_url):
    rng = np.random.default_rng(2)
    async with worker(nats_url) as svc, client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        history = await _prefill(kv, rng, {"s": 30})
        drafts = [_new(rng, "s", 30, 5) for _ in range(SMOL.num_layers)]
        for layer, t in enumerate(drafts):
            await kv.attend(1, layer, [t])
        used = svc.load.used_blocks
        # Two of the five tokens are accepted: keep 32.
        out = await kv.truncate({"s": 32})
        assert out.lengths.tolist() == [32] and (await kv.open("s", SMOL)).length == 32
        assert svc.load.used_blocks == used - 1  # 35 tokens take 3 blocks of 16, 32 take 2
        nxt = _new(rng, "s", 32, 3)
        res = await kv.attend(2, 0, [nxt])
        k0, v0 = history["s", 0]
        kept_k = np.concatenate([k0, drafts[0].k[:2], nxt.k])
        kept_v = np.concatenate([v0, drafts[0].v[:2], nxt.v])
        np.testing.assert_allclose(res.outputs[0], reference(nxt.q, kept_k, kept_v), **TOL)
        for bad in ({"s": 36}, {"nobody": 0}):
            with pytest.raises(bus.RemoteError) as err:
                await kv.truncate(bad)
            assert err.value.code == ("bad_request" if "s" in bad else "unknown_session")
        await kv.truncate({"s": 0})
        assert svc.load.used_blocks == 0 and (await kv.open("s", SMOL)).length == 0


async def test_evict_frees_blocks_and_is_idempotent(nats_url):
    rng = np.random.default_rng(3)
    async with worker(nats_url, blocks=64), client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        await _prefill(kv, rng, {"a": 100, "b": 10})
        assert (await kv.stats()).free_blocks == 64 - 7 - 1
        first = await kv.evict("a")
        assert first.held is True and first.free_tokens == (64 - 1) * 16
        assert (await kv.evict("a")).held is False
        load = await kv.stats()
        assert (load.sessions, load.free_blocks) == (1, 63)
        with pytest.raises(bus.RemoteError) as err:
            await kv.attend(1, 0, [_new(rng, "a", 100, 1)])
        assert err.value.code == "unknown_session"


async def test_bad_messages_get_error_replies_and_change_nothing(nats_url):
    rng = np.random.default_rng(4)
    async with worker(nats_url) as svc, client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        await _prefill(kv, rng, {"s": 10})
        subject = subjects.kv("w1", "attend")
        for payload in (b"\xc1garbage", encode(KVEvict("s")), encode(KVStats())):
            reply = decode((await nc.request(subject, payload, timeout=10)).data)
            assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
        wide = KVGeometry(SMOL.num_layers, 8, 4, 32)
        cases = [
            (KVClient(nc, "w1").attend(1, 0, [_new(rng, "s", 10, 2, wide)]), "bad_request"),
            (kv.attend(1, 0, [_new(rng, "ghost", 0, 2)]), "unknown_session"),
            (kv.attend(1, SMOL.num_layers, [_new(rng, "s", 10, 2)]), "bad_request"),
            (kv.open("other-model", wide), "bad_request"),
        ]
        for call, code in cases:
            with pytest.raises(bus.RemoteError) as err:
                await call
            assert err.value.code == code, err.value
        assert svc.worker._cache.length("s", 0) == 10 and svc.load.sessions == 1
        # A batch that does not fit changes no session (all or nothing).
        with pytest.raises(bus.RemoteError) as err:
            await kv.attend(1, 0, [_new(rng, "s", 10, 1), _new(rng, "s2", 0, 1)])
        assert err.value.code == "unknown_session"
        assert svc.worker._cache.length("s", 0) == 10
        res = await kv.attend(1, 0, [_new(rng, "s", 10, 2)])
        assert res.outputs[0].shape == (2, SMOL.q_heads, SMOL.head_dim)
        stats = await bus.request(nc, subjects.kv("w1", "stats"), KVStats(), 10, expect=KVLoad)
        assert stats.sessions == 1 and stats.attend_requests == 1


async def test_a_full_worker_answers_at_capacity_and_keeps_its_sessions(nats_url):
    rng = np.random.default_rng(5)
    async with worker(nats_url, blocks=4) as svc, client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        await _prefill(kv, rng, {"s": 60})
        with pytest.raises(bus.RemoteError) as err:
            await kv.attend(1, 0, [_new(rng, "s", 60, 5)])
        assert err.value.code == "at_capacity" and err.value.retry_after_s > 0
        assert svc.worker._cache.length("s", 0) == 60 and svc.load.free_blocks == 0
        res = await kv.attend(1, 0, [_new(rng, "s", 60, 4)])  # exactly fills the last block
        assert len(res.outputs) == 1 and svc.worker._cache.length("s", 0) == 64


async def test_sessions_left_idle_by_a_vanished_verifier_are_evicted(nats_url):
    rng = np.random.default_rng(6)
    async with worker(nats_url, session_ttl_s=0.5) as svc, client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        await _prefill(kv, rng, {"idle": 40, "busy": 40})
        length = 40
        for fwd in range(1, 30):  # the busy session keeps attending; the idle one is silent
            await kv.attend(fwd, 0, [_new(rng, "busy", length, 1)])
            length += 1
            if svc.load.sessions == 1:
                break
            await asyncio.sleep(0.1)
        assert svc.load.sessions == 1 and svc.load.used_blocks == -(-length // 16)  # busy only
        with pytest.raises(bus.RemoteError) as err:
            await kv.attend(99, 0, [_new(rng, "idle", 40, 1)])
        assert err.value.code == "unknown_session"
        assert (await kv.open("busy", SMOL)).length == length
