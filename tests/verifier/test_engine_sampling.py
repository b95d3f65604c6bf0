"""Sampling sessions: the engine draws from the right streams and keeps p exact."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from sled_shared.speculative import (
    Purpose,
    SamplingParams,
    position_rng,
    sample,
    target_probs,
)
from sled_verifier.engine import VerifierEngine, VerifyRound

from .conftest import reference_logits, tiny_config

PROMPT = [14, 15, 92, 65, 35]


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    return VerifierEngine(
        tiny_config(tiny_model_dirs["gqa"], num_blocks=256, block_size=16, max_sessions=256)
    )


def _p(hf_model, ids, params) -> np.ndarray:
    return target_probs(reference_logits(hf_model, ids)[-1:].numpy(), params)[0]


def test_first_and_bonus_tokens_use_their_position_streams(engine, hf_models):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234)
    o = engine.open_session(PROMPT, params, max_new_tokens=10, stream=77)
    hf = hf_models["gqa"]
    rng = position_rng(1234, 77, len(PROMPT), Purpose.FIRST)
    assert o.first_token == sample(None, _p(hf, PROMPT, params), rng)
    history = [*PROMPT, o.first_token]
    # K = 0: the round's token is a bonus from p at position len(history), RESAMPLE stream.
    (res,) = engine.verify([VerifyRound(o.session_id, 1, len(history), np.array([], int), [])])
    rng = position_rng(1234, 77, len(history), Purpose.RESAMPLE)
    assert res.next_token == sample(None, _p(hf, history, params), rng)
    engine.close(o.session_id)


def test_sampling_round_without_draft_distributions_is_an_error(engine):
    o = engine.open_session(PROMPT, SamplingParams(temperature=1.0, seed=1), 10, stream=0)
    (res,) = engine.verify([VerifyRound(o.session_id, 1, len(PROMPT) + 1, np.array([5]))])
    assert "draft distribution" in res.error
    bad_dist = [(np.array([6], np.int32), np.array([1.0]))]  # draft 5 is outside its support
    (res,) = engine.verify([VerifyRound(o.session_id, 1, len(PROMPT) + 1, np.array([5]), bad_dist)])
    assert res.error.startswith("bad draft")
    assert engine.blocks.length(o.session_id) == len(PROMPT)  # KV rolled back
    engine.close(o.session_id)


def test_emitted_token_follows_target_distribution_whatever_the_draft(engine, hf_models):
    """A draft that always proposes the target's least likely top-3 token, with q = 1.

    Accept-always would emit that token every time; the exact rule must emit p.
    """
    hf = hf_models["gqa"]
    history = [*PROMPT, int(reference_logits(hf, PROMPT)[-1].argmax())]
    params_of = [SamplingParams(temperature=1.0, top_k=3, seed=s) for s in range(200)]
    # Resumed from the same history, every session is in the same state; seeds differ.
    opened = [engine.open_session(history, p, 5, stream=0, resume=True) for p in params_of]
    p = _p(hf, history, params_of[0])
    support = np.flatnonzero(p)
    draft = int(support[np.argmin(p[support])])
    dist = [(np.array([draft], np.int32), np.array([1.0]))]
    rounds = [VerifyRound(o.session_id, 1, len(history), np.array([draft]), dist) for o in opened]
    emitted = Counter()
    for res in engine.verify(rounds):
        assert res.error is None
        emitted[draft if res.accepted else res.next_token] += 1
    n = len(opened)
    freq = np.array([emitted[t] / n for t in support])
    assert sum(emitted.values()) == n and set(emitted) <= set(support.tolist())
    # Deterministic seeds; 0.12 is ~3 standard errors of a TV estimate over 3 outcomes at n=200.
    tv = 0.5 * np.abs(freq - p[support]).sum()
    assert tv < 0.12, (freq, p[support])
    assert abs(emitted[draft] / n - p[draft]) < 0.1
    for o in opened:
        engine.close(o.session_id)
