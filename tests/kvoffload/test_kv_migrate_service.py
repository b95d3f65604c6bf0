"""Moving whole sessions in and out of workers over NATS, in payload-sized chunks."""

from __future__ import annotations

import numpy as np
import pytest
from sled_shared import bus, subjects
from sled_shared.kv_client import KVClient, SessionTokens
from sled_shared.kv_migrate_protocol import KVChunk, KVExport, KVImportBegin, KVImportEnd
from sled_shared.kv_protocol import KVGeometry

from .conftest import client, rand, reference, worker

# 4 layers x 256 tokens x 8 kv heads x 128 x (K and V) x 4 bytes = 8 MiB: many NATS messages.
BIG = KVGeometry(num_layers=4, q_heads=16, kv_heads=8, head_dim=128)
TOKENS = 256


async def test_multi_mb_session_round_trips_exactly_and_attends_the_same_after_a_move(nats_url):
    rng = np.random.default_rng(7)
    shape = (BIG.num_layers, TOKENS, BIG.kv_heads, BIG.head_dim)
    k, v = rand(rng, *shape), rand(rng, *shape)
    async with (
        worker(nats_url, "w1", blocks=64) as w1,
        worker(nats_url, "w2", blocks=64) as w2,
        client(nats_url) as nc,
    ):
        one, two = KVClient(nc, "w1", timeout_s=30), KVClient(nc, "w2", timeout_s=30)
        ack = await one.import_session("s", BIG, k, v)
        assert ack.complete and ack.total_len == TOKENS and ack.received == 1.0
        assert (await one.stats()).used_blocks == TOKENS // 16
        # Chunks stay under the server's payload limit; 8 MiB needs well over 8 of them.
        first = await bus.request(
            nc, subjects.kv("w1", "migrate"), KVExport("s", 0, one.default_chunk_bytes()), 30,
            expect=KVChunk,
        )  # fmt: skip
        assert first.num_chunks >= 8 and first.keys.nbytes * 2 <= nc.max_payload
        back_k, back_v = await one.export_session("s")
        np.testing.assert_array_equal(back_k, k)
        np.testing.assert_array_equal(back_v, v)
        # Move to w2 (export, import, evict), then attend there: as if it never moved.
        await two.import_session("s", BIG, *(await one.export_session("s")))
        assert (await one.evict("s")).held and (await one.stats()).used_blocks == 0
        assert w1.load.sessions == 0 and w2.load.sessions == 1
        q = rand(rng, 3, BIG.q_heads, BIG.head_dim)
        nk, nv = rand(rng, 3, BIG.kv_heads, BIG.head_dim), rand(rng, 3, BIG.kv_heads, BIG.head_dim)
        res = await two.attend(5, 2, [SessionTokens("s", TOKENS, nk, nv, q)])
        want = reference(q, np.concatenate([k[2], nk]), np.concatenate([v[2], nv]))
        np.testing.assert_allclose(res.outputs[0], want, rtol=2e-4, atol=2e-5)


async def test_import_reserves_first_refuses_when_full_and_aborts_cleanly(nats_url):
    rng = np.random.default_rng(8)
    g = KVGeometry(num_layers=2, q_heads=4, kv_heads=2, head_dim=16)
    async with worker(nats_url, "w1", blocks=8) as svc, client(nats_url) as nc:
        kv = KVClient(nc, "w1")
        migrate = subjects.kv("w1", "migrate")
        k = rand(rng, 2, 200, 2, 16)
        with pytest.raises(bus.RemoteError) as err:  # 200 tokens need 13 blocks of 16
            await kv.import_session("big", g, k, k)
        assert err.value.code == "at_capacity" and err.value.retry_after_s > 0
        assert svc.load.free_blocks == 8 and svc.load.sessions == 0
        # A begun import that misses chunks is refused at the end, then aborted.
        await bus.request(nc, migrate, KVImportBegin("p", g, 40), 10)
        chunk = KVChunk("p", 0, 2, 0, 0, 40, 2, 16, rand(rng, 40 * 32), rand(rng, 40 * 32))
        assert (await bus.request(nc, migrate, chunk, 10)).received == pytest.approx(0.5)
        assert (await bus.request(nc, migrate, chunk, 10)).received == pytest.approx(0.5)
        with pytest.raises(bus.RemoteError) as err:
            await bus.request(nc, migrate, KVImportEnd("p"), 10)
        assert err.value.code == "bad_request" and "40 layer-tokens missing" in str(err.value)
        one = SessionTokens("p", 40, rand(rng, 1, 2, 16), rand(rng, 1, 2, 16), rand(rng, 1, 4, 16))
        with pytest.raises(bus.RemoteError) as err:  # no attends into a half-imported session
            await kv.attend(1, 0, [one])
        assert err.value.code == "bad_request"
        assert (await bus.request(nc, migrate, KVImportEnd("p", abort=True), 10)).complete
        assert svc.load.free_blocks == 8 and svc.load.sessions == 0
        # Chunks of an import that is not (or no longer) running are refused.
        with pytest.raises(bus.RemoteError) as err:
            await bus.request(nc, migrate, chunk, 10)
        assert err.value.code == "unknown_session"
