"""Failover over NATS: the verifier disappears mid-session, the device resumes on
another one with its committed history, and the text is the same as without."""

from __future__ import annotations

import pytest
from sled_shared import bus

from .drafting import K_SCHEDULE, scripted_case
from .service_harness import client, open_session, running_service, verify

PROMPT = [14, 15, 92, 65, 35, 3]
MAX_NEW = 36
STREAM = 11


async def drive(nc, verifier_id, sid, history, propose, first_round=0, stop_after=None):
    """Rounds over NATS until finished (or `stop_after` rounds): (history, reason, rounds)."""
    for rnd in range(1, 200):
        k = K_SCHEDULE[(first_round + rnd - 1) % len(K_SCHEDULE)]
        drafts, dists = propose(history, k)
        resp = await verify(nc, verifier_id, sid, rnd, len(history), drafts, dists)
        history = [*history, *drafts[: resp.accepted].tolist(), resp.next_token]
        if resp.finished or rnd == stop_after:
            return history, resp.reason, rnd
    raise AssertionError("session did not finish")


@pytest.mark.parametrize("kind", ["greedy", "sampling"])
async def test_failover_resume_gives_the_same_text(kind, nats_url, tiny_model_dirs, hf_models):
    model_dir = tiny_model_dirs["qwen2-bias"]
    params, propose, ref = scripted_case(kind, hf_models["qwen2-bias"], PROMPT, MAX_NEW, STREAM)
    async with client(nats_url) as nc:
        async with running_service(nats_url, model_dir, verifier_id="v-a") as a:
            o = await open_session(nc, PROMPT, max_new_tokens=MAX_NEW, params=params, stream=STREAM)
            expected, reason, _ = await drive(
                nc, a.id, o.session_id, [*PROMPT, o.first_token], propose
            )
            if ref is not None:
                assert expected[len(PROMPT) :] == ref

            o = await open_session(nc, PROMPT, max_new_tokens=MAX_NEW, params=params, stream=STREAM)
            history, _, rounds = await drive(
                nc, a.id, o.session_id, [*PROMPT, o.first_token], propose, 0, 3
            )
        # v-a is gone, with the session's KV; the device still holds the history.
        with pytest.raises(bus.NoResponders):
            await verify(nc, "v-a", o.session_id, rounds + 1, len(history), [])
        assert len(PROMPT) + 2 < len(history) < len(expected)

        async with running_service(nats_url, model_dir, verifier_id="v-b") as b:
            generated = len(history) - len(PROMPT)
            r = await open_session(
                nc,
                history,
                max_new_tokens=MAX_NEW - generated,
                params=params,
                stream=STREAM,
                resume=True,
            )
            assert r.verifier_id == "v-b" and r.first_token == history[-1]
            assert b.service.engine.stats().kv_blocks_used == -(-(len(history) - 1) // 4)
            resumed, resumed_reason, _ = await drive(
                nc, b.id, r.session_id, history, propose, rounds
            )
        assert resumed == expected and resumed_reason == reason
