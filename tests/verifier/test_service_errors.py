"""Bad input, full queues and idle sessions: clear error replies, nothing else lost."""

from __future__ import annotations

import asyncio
import threading

import msgpack
import numpy as np
import pytest
from sled_shared import bus, subjects
from sled_shared.protocol import ErrorReply, SessionClose, SessionOpen, decode, encode
from sled_shared.speculative import SamplingParams

from .drafting import greedy_drafts, hf_greedy
from .service_harness import (
    TIMEOUT,
    client,
    open_session,
    running_service,
    srv,
    verify,
    wait_until,
)

PROMPT = [9, 3, 77, 21, 40]


async def raw(nc, subject: str, data: bytes) -> ErrorReply:
    reply = decode((await nc.request(subject, data, timeout=TIMEOUT)).data)
    assert isinstance(reply, ErrorReply), reply
    return reply


async def remote_error(coro) -> bus.RemoteError:
    with pytest.raises(bus.RemoteError) as err:
        await coro
    return err.value


async def test_bad_input_gets_error_replies_while_others_go_on(
    nats_url, tiny_model_dirs, hf_models
):
    ref = hf_greedy(hf_models["gqa"], PROMPT, 40)
    async with running_service(nats_url, tiny_model_dirs["gqa"]) as run, client(nats_url) as nc:
        good = await open_session(nc, PROMPT, device="good", max_new_tokens=40)
        victim = await open_session(nc, [4, 5, 6], device="bad")
        vsid = victim.session_id

        async def good_session() -> list[int]:
            history = [*PROMPT, good.first_token]
            for rnd in range(1, 100):
                drafts = greedy_drafts(ref, len(history) - len(PROMPT), 2)
                resp = await verify(nc, run.id, good.session_id, rnd, len(history), drafts)
                history += [*drafts[: resp.accepted].tolist(), resp.next_token]
                if resp.finished:
                    return history[len(PROMPT) :]
            raise AssertionError("good session did not finish")

        async def bad_requests() -> list[tuple[str, str]]:
            vs = subjects.verify(run.id)
            out = [(await raw(nc, vs, b"\x00not msgpack")).code]
            out.append((await raw(nc, vs, encode(SessionClose(vsid)))).code)  # wrong type
            body = msgpack.unpackb(encode(SessionClose(vsid)))
            body["v"] = 99
            out.append((await raw(nc, subjects.session_close(run.id), msgpack.packb(body))).code)
            for call in (
                verify(nc, run.id, vsid, 1, 99, [7]),  # wrong committed length
                verify(nc, run.id, vsid, 5, 4, [7]),  # skips rounds
                verify(nc, run.id, vsid, 1, 4, [500]),  # outside the vocabulary
                verify(nc, run.id, vsid, 1, 4, list(range(3, 40))),  # more drafts than max_k
                open_session(nc, [1, 2, 400]),  # prompt outside the vocabulary
                open_session(nc, [3] * 300),  # longer than the model's context
            ):
                out.append((await remote_error(call)).code)
            return out

        output, codes = await asyncio.gather(good_session(), bad_requests())
        assert output == ref
        assert codes[2] == "unsupported_version"
        assert codes[:2] + codes[3:] == ["bad_request"] * 8
        # The victim's bad rounds did not advance or break it.
        resp = await verify(nc, run.id, vsid, 1, 4, [])
        assert resp.round == 1 and resp.batch_size == 1


async def test_full_queue_and_full_sessions_answer_at_capacity(nats_url, tiny_model_dirs):
    async with (
        running_service(
            nats_url, tiny_model_dirs["gqa"], max_queue=2, max_sessions=4, batch_window_ms=0
        ) as run,
        client(nats_url) as nc,
    ):
        opened = [await open_session(nc, [10 + i, 20, 30]) for i in range(4)]
        err = await remote_error(open_session(nc, [1, 2, 3]))
        assert err.code == "at_capacity" and err.retry_after_s > 0

        ping = await srv(nc, "$SRV.PING.sled-verifier")

        async def verify_data() -> dict:
            stats = await srv(nc, f"$SRV.STATS.sled-verifier.{ping['id']}")
            return next(e for e in stats["endpoints"] if e["name"] == "verify")["data"]

        async def until(check) -> None:
            for _ in range(int(TIMEOUT / 0.02)):
                if check(await verify_data()):
                    return
                await asyncio.sleep(0.02)
            raise AssertionError("the service never reached the expected queue state")

        def round1(o):
            return verify(nc, run.id, o.session_id, 1, 4, [])

        # Keep the engine thread busy, as a long batch would.
        hold = threading.Event()
        run.service.engine_thread.submit(hold.wait, TIMEOUT)
        try:
            a = asyncio.create_task(round1(opened[0]))
            await until(lambda d: d["in_flight"] == 1 and d["queue_depth"] == 0)  # A is batched
            b, c = asyncio.create_task(round1(opened[1])), asyncio.create_task(round1(opened[2]))
            await until(lambda d: d["queue_depth"] == 2)
            err = await remote_error(round1(opened[3]))
            assert err.code == "at_capacity" and err.retry_after_s > 0
        finally:
            hold.set()
        answers = await asyncio.gather(a, b, c)
        assert [r.batch_size for r in answers] == [1, 2, 2]
        retried = await round1(opened[3])  # retrying later works
        assert retried.round == 1 and retried.next_token >= 0


async def test_idle_sessions_are_evicted_and_busy_ones_kept(nats_url, tiny_model_dirs):
    async with (
        running_service(nats_url, tiny_model_dirs["gqa"], session_ttl_s=2.0) as run,
        client(nats_url) as nc,
    ):
        idle = await open_session(nc, [4, 5, 6, 7])
        busy = await open_session(nc, [8, 9, 10], max_new_tokens=200)
        assert run.metric("sled_verifier_kv_blocks_used", tier="accelerator") == 1 + 1
        committed, rnd = 4, 0
        while run.metric("sled_verifier_sessions_evicted_total") == 0:
            rnd += 1
            resp = await verify(nc, run.id, busy.session_id, rnd, committed, [])
            committed += 1
            assert rnd < 150, "the idle session was never evicted"
            await asyncio.sleep(0.05)
        err = await remote_error(verify(nc, run.id, idle.session_id, 1, 5, []))
        assert err.code == "unknown_session"
        resp = await verify(nc, run.id, busy.session_id, rnd + 1, committed, [])
        assert resp.round == rnd + 1
        await wait_until(lambda: run.metric("sled_verifier_active_sessions") == 1)
        assert run.metric("sled_verifier_sessions_evicted_total") == 1
        # Only the busy session holds KV now: all its committed tokens but the newest.
        busy_blocks = -(-committed // 4)  # block_size 4; committed + 1 tokens, KV of committed
        assert run.metric("sled_verifier_kv_blocks_used", tier="accelerator") == busy_blocks


def test_session_open_resume_field_round_trips_and_is_checked():
    msg = SessionOpen(np.arange(5), 3, "ngram", "d", SamplingParams(seed=1), 9, resume=True)
    assert decode(encode(msg)) == msg and decode(encode(msg)).resume is True
    with pytest.raises(ValueError, match="at least one generated token"):
        SessionOpen(np.arange(1), 3, "ngram", "d", resume=True)
    with pytest.raises(ValueError, match="resume"):
        SessionOpen(np.arange(3), 3, "ngram", "d", resume=1)
