"""The verifier service over a real nats-server: sessions, batching, retries, discovery."""

from __future__ import annotations

import asyncio

import pytest
from sled_shared import bus, subjects

from .drafting import K_SCHEDULE, greedy_drafts, hf_greedy
from .service_harness import client, close, open_session, running_service, srv, verify

PROMPT = [9, 3, 77, 21, 40]


async def test_session_over_nats_is_lossless_and_discoverable(nats_url, tiny_model_dirs, hf_models):
    ref = hf_greedy(hf_models["gqa"], PROMPT, 30)
    async with running_service(nats_url, tiny_model_dirs["gqa"]) as run, client(nats_url) as nc:
        opened = await open_session(nc, PROMPT, device="pi-a", max_new_tokens=30)
        assert opened.verifier_id == run.id and opened.first_token == ref[0]
        sid, history, rnd = opened.session_id, [*PROMPT, opened.first_token], 0
        while True:
            rnd += 1
            drafts = greedy_drafts(ref, len(history) - len(PROMPT), K_SCHEDULE[rnd % 8])
            resp = await verify(nc, run.id, sid, rnd, len(history), drafts)
            assert (resp.session_id, resp.round, resp.batch_size) == (sid, rnd, 1)
            assert resp.compute_s > 0 and resp.queue_s >= 0
            history += [*drafts[: resp.accepted].tolist(), resp.next_token]
            if resp.finished:
                break
        assert history[len(PROMPT) :] == ref
        assert resp.reason == ("stop" if ref[-1] == 2 else "length") and resp.suggested_k == 0

        assert run.metric("sled_verifier_rounds_total") == rnd
        assert run.metric("sled_verifier_sessions_opened_total") == 1
        assert run.metric("sled_verifier_sessions_closed_total") == 1  # finished
        # A finished session gives its KV back at once.
        assert run.metric("sled_verifier_kv_blocks_used", tier="accelerator") == 0
        assert run.metric("sled_verifier_kv_blocks_capacity", tier="accelerator") == 64
        assert run.metric("sled_verifier_prefill_seconds_count") == 1
        assert run.metric("sled_verifier_batch_size_count") == rnd

        ping = await srv(nc, "$SRV.PING.sled-verifier")
        assert ping["metadata"]["verifier_id"] == run.id
        info = await srv(nc, f"$SRV.INFO.sled-verifier.{ping['id']}")
        eps = {e["name"]: e for e in info["endpoints"]}
        assert eps["open"]["subject"] == subjects.SESSION_OPEN
        assert eps["open"]["queue_group"] == subjects.VERIFIER_QUEUE
        assert eps["verify"]["subject"] == subjects.verify(run.id)
        assert eps["close"]["subject"] == subjects.session_close(run.id)
        stats = await srv(nc, f"$SRV.STATS.sled-verifier.{ping['id']}")
        ep = next(e for e in stats["endpoints"] if e["name"] == "verify")
        assert ep["num_requests"] == rnd and ep["num_errors"] == 0
        assert ep["data"]["batches"] == rnd and ep["data"]["max_batch_devices"] == 1

        assert (await close(nc, run.id, sid)).session_id == sid
        assert run.metric("sled_verifier_sessions_closed_total") == 1  # counted once
        for again in (verify(nc, run.id, sid, rnd + 1, len(history), []), close(nc, run.id, sid)):
            with pytest.raises(bus.RemoteError) as err:
                await again
            assert err.value.code == "unknown_session"


async def test_rounds_from_several_devices_share_one_batch(nats_url, tiny_model_dirs, hf_models):
    prompts = [[5 + i, 17, 33, 8 + 3 * i] for i in range(4)]
    refs = [hf_greedy(hf_models["gqa"], p, 12) for p in prompts]
    async with (
        running_service(
            nats_url, tiny_model_dirs["gqa"], max_sessions=4, batch_window_ms=500
        ) as run,
        client(nats_url) as nc,
    ):
        opened = [
            await open_session(nc, p, device=f"device-{i}", max_new_tokens=12)
            for i, p in enumerate(prompts)
        ]
        drafts = [greedy_drafts(ref, 1, 3) for ref in refs]
        together = await asyncio.gather(
            *(
                verify(nc, run.id, o.session_id, 1, len(p) + 1, d)
                for o, p, d in zip(opened, prompts, drafts, strict=True)
            )
        )
        for resp, ref, d in zip(together, refs, drafts, strict=True):
            assert resp.batch_size == 4
            # Batched answers are the target's own tokens, as if each ran alone.
            assert [*d[: resp.accepted].tolist(), resp.next_token] == ref[1 : resp.accepted + 2]
            # A batch filling every session slot is full load: K drops to 0.
            assert resp.suggested_k == 0
        assert len({r.compute_s for r in together}) == 1  # one engine call for all four

        o, p, ref = opened[0], prompts[0], refs[0]
        done = together[0].accepted + 2
        alone = await verify(nc, run.id, o.session_id, 2, len(p) + done, ref[done : done + 2])
        assert alone.batch_size == 1 and alone.suggested_k > 0  # a quarter load keeps K

        assert run.metric("sled_verifier_batch_devices_count") == 2
        assert run.metric("sled_verifier_batch_devices_sum") == 4 + 1
        assert run.metric("sled_verifier_batch_devices_bucket", le="2.0") == 1
        ping = await srv(nc, "$SRV.PING.sled-verifier")
        stats = await srv(nc, f"$SRV.STATS.sled-verifier.{ping['id']}")
        data = next(e for e in stats["endpoints"] if e["name"] == "verify")["data"]
        assert data["max_batch_devices"] == 4 and data["multi_device_batches"] == 1
        assert data["max_batch_size"] == 4 and data["last_batch_size"] == 1


async def test_retried_round_is_answered_once(nats_url, tiny_model_dirs, hf_models):
    ref = hf_greedy(hf_models["gqa"], PROMPT, 20)
    async with (
        running_service(nats_url, tiny_model_dirs["gqa"], batch_window_ms=300) as run,
        client(nats_url) as nc,
    ):
        opened = await open_session(nc, PROMPT, max_new_tokens=20)
        sid, history = opened.session_id, [*PROMPT, opened.first_token]
        drafts = greedy_drafts(ref, 1, 4)
        # The retry arrives while the original still waits in the batching window.
        first, retry = await asyncio.gather(
            verify(nc, run.id, sid, 1, len(history), drafts),
            verify(nc, run.id, sid, 1, len(history), drafts),
        )
        assert first == retry and first.batch_size == 1
        assert run.service.engine.stats().rounds_total == 1
        # A retry after the answer gets it from memory, without a batch.
        late = await verify(nc, run.id, sid, 1, len(history), drafts)
        fields = ("accepted", "next_token", "finished", "reason", "suggested_k")
        assert [getattr(late, f) for f in fields] == [getattr(first, f) for f in fields]
        assert late.batch_size == 0
        history += [*drafts[: first.accepted].tolist(), first.next_token]
        assert history[len(PROMPT) :] == ref[: len(history) - len(PROMPT)]
        # The session advanced exactly once: round 2 follows from the committed length.
        second = await verify(nc, run.id, sid, 2, len(history), [])
        assert second.next_token == ref[len(history) - len(PROMPT)]
        assert run.service.engine.stats().rounds_total == 2
        assert run.metric("sled_verifier_rounds_total") == 2
