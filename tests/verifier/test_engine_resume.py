"""Failover resume in the engine: a session reopened elsewhere from its committed
history continues with exactly the tokens an uninterrupted run produces."""

from __future__ import annotations

import numpy as np
import pytest
from sled_shared.speculative import SamplingParams
from sled_verifier.engine import VerifierEngine, VerifyRound

from .conftest import tiny_config
from .drafting import K_SCHEDULE, scripted_case

PROMPT = [5, 17, 33, 8, 91, 40, 12]
MAX_NEW = 40
STREAM = 7


def drive(engine, sid, history, propose, first_round=0, stop_after=None):
    """Rounds until the session finishes (or after `stop_after` rounds).

    Returns (history, finish reason or None, rounds run, drafted, accepted).
    """
    drafted = accepted = 0
    for rnd in range(1, 200):
        k = K_SCHEDULE[(first_round + rnd - 1) % len(K_SCHEDULE)]
        drafts, dists = propose(history, k)
        (res,) = engine.verify([VerifyRound(sid, rnd, len(history), drafts, dists)])
        assert res.error is None, res.error
        history = [*history, *drafts[: res.accepted].tolist(), res.next_token]
        drafted, accepted = drafted + len(drafts), accepted + res.accepted
        if res.finished or rnd == stop_after:
            return history, res.reason, rnd, drafted, accepted
    raise AssertionError("session did not finish")


@pytest.mark.parametrize("kind", ["greedy", "sampling"])
def test_resumed_session_continues_with_the_same_tokens(kind, tiny_model_dirs, hf_models):
    model_dir, hf = tiny_model_dirs["gqa"], hf_models["gqa"]
    params, propose, ref = scripted_case(kind, hf, PROMPT, MAX_NEW, STREAM)

    whole = VerifierEngine(tiny_config(model_dir))
    o = whole.open_session(PROMPT, params, MAX_NEW, STREAM)
    expected, reason, *_, drafted, accepted = drive(
        whole, o.session_id, [*PROMPT, o.first_token], propose
    )
    if ref is not None:
        assert expected[len(PROMPT) :] == ref  # lossless before any failover question
    assert 0 < accepted < drafted  # both accepted and rejected drafts happened

    first = VerifierEngine(tiny_config(model_dir))
    o = first.open_session(PROMPT, params, MAX_NEW, STREAM)
    history, _, rounds, *_ = drive(first, o.session_id, [*PROMPT, o.first_token], propose, 0, 3)
    assert len(PROMPT) + 2 < len(history) < len(expected)
    del first  # the verifier is gone; the drafter keeps the history

    second = VerifierEngine(tiny_config(model_dir))
    remaining = MAX_NEW - (len(history) - len(PROMPT))
    r = second.open_session(history, params, remaining, STREAM, resume=True)
    assert r.first_token == history[-1] and not r.finished
    assert second.blocks.length(r.session_id) == len(history) - 1  # prefilled, nothing sampled
    resumed, resumed_reason, *_ = drive(second, r.session_id, history, propose, rounds)
    assert resumed == expected
    assert resumed_reason == reason


def test_resume_needs_a_generated_token_and_room(tiny_model_dirs):
    engine = VerifierEngine(tiny_config(tiny_model_dirs["gqa"]))
    with pytest.raises(ValueError, match="at least one generated token"):
        engine.open_session([5], SamplingParams(), 4, 0, resume=True)
    # A history with one token still allowed ends after exactly that token.
    r = engine.open_session([5, 6, 7], SamplingParams(), 1, 0, resume=True)
    assert r.first_token == 7 and not r.finished
    (res,) = engine.verify([VerifyRound(r.session_id, 1, 3, np.array([], np.int32))])
    assert res.finished and res.reason == "length"
    assert engine.stats().kv_blocks_used == 0
