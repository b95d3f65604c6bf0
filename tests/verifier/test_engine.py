"""VerifierEngine on tiny random models: lossless greedy rounds, retries, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sled_shared.speculative import SamplingParams
from sled_verifier.engine import CapacityError, VerifierEngine, VerifyRound

from .conftest import tiny_config

GREEDY = SamplingParams()
EOS = 2


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (stops at EOS, as ours does)."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def committed(engine: VerifierEngine, sid: str) -> int:
    return len(engine._sessions[sid].tokens)


def drive(engine, sid, first, draft_fn, ks, max_rounds=100):
    """Run rounds until the session finishes: (generated tokens, [(drafts sent, result)])."""
    generated, log = [first], []
    for rnd in range(1, max_rounds + 1):
        drafts = np.array(draft_fn(generated, ks[(rnd - 1) % len(ks)]), dtype=np.int32)
        (res,) = engine.verify([VerifyRound(sid, rnd, committed(engine, sid), drafts)])
        assert res.error is None, res.error
        generated += [*drafts[: res.accepted].tolist(), res.next_token]
        log.append((len(drafts), res))
        if res.finished:
            return generated, log
    raise AssertionError("session did not finish")


@pytest.fixture(scope="module")
def engine(tiny_model_dirs):
    return VerifierEngine(tiny_config(tiny_model_dirs["gqa"], num_blocks=128))


@pytest.mark.parametrize("name", ["gqa", "qwen2-bias", "llama3-rope"])
def test_self_drafts_all_accepted_output_equals_generate(name, tiny_model_dirs, hf_models):
    prompt = [5, 17, 33, 8, 91, 40, 12]
    ref = hf_greedy(hf_models[name], prompt, 40)
    eng = VerifierEngine(tiny_config(tiny_model_dirs[name]))
    opened = eng.open_session(prompt, GREEDY, max_new_tokens=40, stream=0)
    assert opened.first_token == ref[0]

    def oracle(gen, k):  # the target's own continuation
        return ref[len(gen) : len(gen) + k]

    out, log = drive(eng, opened.session_id, ref[0], oracle, [3, 0, 5, 1, 8])
    assert out == ref
    # Every round but the last (clipped to the token budget, or cut at EOS) takes all drafts.
    assert all(res.accepted == sent for sent, res in log[:-1])
    assert log[-1][1].reason == ("stop" if ref[-1] == EOS else "length")
    assert eng.stats().kv_blocks_used == 0  # a finished session gives its KV back


def test_random_drafts_mostly_rejected_output_still_equals_generate(engine, hf_models):
    prompt = [9, 3, 77, 21]
    ref = hf_greedy(hf_models["gqa"], prompt, 30)
    opened = engine.open_session(prompt, GREEDY, max_new_tokens=30, stream=0)
    rng = np.random.default_rng(0)
    out, log = drive(
        engine, opened.session_id, opened.first_token, lambda g, k: rng.integers(3, 96, k), [4]
    )
    assert out == ref
    drafted = sum(sent for sent, _ in log)
    assert sum(res.accepted for _, res in log) < 0.2 * drafted
    engine.close(opened.session_id)


def test_batched_sessions_each_equal_generate(engine, hf_models):
    prompts = [[4, 8, 15, 16, 23, 42], [7], [60, 61, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71, 72]]
    refs = [hf_greedy(hf_models["gqa"], p, 25) for p in prompts]
    opened = [
        engine.open_session(p, GREEDY, max_new_tokens=25, stream=i) for i, p in enumerate(prompts)
    ]
    gen = {o.session_id: [o.first_token] for o in opened}
    ref_of = {o.session_id: r for o, r in zip(opened, refs, strict=True)}
    rng = np.random.default_rng(1)
    live = [o.session_id for o in opened if not o.finished]
    rnd = 0
    while live:
        rnd += 1
        rounds = []
        for j, sid in enumerate(live):
            g, r = gen[sid], ref_of[sid]
            k = (rnd + j) % 5
            # Session-dependent mix of good drafts (oracle), random ones and K = 0.
            drafts = r[len(g) : len(g) + k] if j % 2 == 0 else rng.integers(3, 96, k).tolist()
            rounds.append(
                VerifyRound(sid, rnd, len(engine._sessions[sid].tokens), np.array(drafts))
            )
        for rd, res in zip(rounds, engine.verify(rounds), strict=True):
            assert res.error is None, res.error
            gen[rd.session_id] += [*rd.draft_ids[: res.accepted].tolist(), res.next_token]
        live = [sid for sid in live if not engine._sessions[sid].finished]
    for o, r in zip(opened, refs, strict=True):
        assert gen[o.session_id] == r
        engine.close(o.session_id)


def test_repeated_round_returns_same_result_without_advancing(engine, hf_models):
    prompt = [11, 12, 13]
    ref = hf_greedy(hf_models["gqa"], prompt, 20)
    o = engine.open_session(prompt, GREEDY, max_new_tokens=20, stream=0)
    rd = VerifyRound(o.session_id, 1, len(prompt) + 1, np.array(ref[1:4]))
    (first,) = engine.verify([rd])
    tokens_after = list(engine._sessions[o.session_id].tokens)
    blocks_after = engine.blocks.length(o.session_id)
    (again,) = engine.verify([rd])
    assert again == first
    assert engine._sessions[o.session_id].tokens == tokens_after
    assert engine.blocks.length(o.session_id) == blocks_after
    # The next round continues from the single advance.
    (nxt,) = engine.verify([VerifyRound(o.session_id, 2, len(tokens_after), np.array([], int))])
    assert nxt.error is None and nxt.next_token == ref[len(tokens_after) - len(prompt)]
    engine.close(o.session_id)


def test_bad_rounds_get_errors_and_leave_other_sessions_alone(engine, hf_models):
    good_prompt, bad_prompt = [30, 31, 32, 33], [50, 51]
    ref = hf_greedy(hf_models["gqa"], good_prompt, 10)
    good = engine.open_session(good_prompt, GREEDY, max_new_tokens=10, stream=0)
    bad = engine.open_session(bad_prompt, GREEDY, max_new_tokens=10, stream=1)
    bad_len = len(bad_prompt) + 1
    bad_rounds = [
        VerifyRound(bad.session_id, 5, bad_len, np.array([1])),  # skips rounds 1-4
        VerifyRound(bad.session_id, 0, bad_len, np.array([1])),  # stale
        VerifyRound(bad.session_id, 1, bad_len + 3, np.array([1])),  # committed_len mismatch
        VerifyRound(bad.session_id, 1, bad_len, np.arange(9)),  # K above max_k
        VerifyRound(bad.session_id, 1, bad_len, np.array([96])),  # outside the vocabulary
        VerifyRound("nope", 1, 3, np.array([1])),  # unknown session
    ]
    for bad_round in bad_rounds:
        good_round = VerifyRound(good.session_id, 1, len(good_prompt) + 1, np.array(ref[1:3]))
        res_bad, res_good = engine.verify([bad_round, good_round])
        assert res_bad.error and res_bad.round == bad_round.round
        # The good session's round 1 is answered once and then replayed identically.
        assert res_good.error is None and res_good.accepted == 2 and res_good.next_token == ref[3]
    assert engine._sessions[bad.session_id].tokens == [*bad_prompt, bad.first_token]
    assert engine.blocks.length(bad.session_id) == len(bad_prompt)
    engine.close(good.session_id)
    engine.close(bad.session_id)


def test_same_session_twice_in_one_batch_is_an_error(engine):
    o = engine.open_session([3, 4, 5], GREEDY, max_new_tokens=5, stream=0)
    rd = VerifyRound(o.session_id, 1, 4, np.array([], int))
    first, second = engine.verify([rd, rd])
    assert first.error is None and second.error == "session appears twice in one batch"
    engine.close(o.session_id)


def test_stop_token_inside_accepted_drafts_truncates(engine, hf_models):
    prompt = [20, 21, 22, 23, 24]
    ref = hf_greedy(hf_models["gqa"], prompt, 12)
    stop = ref[3]
    cut = ref.index(stop)  # first occurrence ends the text
    o = engine.open_session(prompt, GREEDY, max_new_tokens=12, stream=0, stop_token_ids=[stop])
    (res,) = engine.verify([VerifyRound(o.session_id, 1, len(prompt) + 1, np.array(ref[1:9]))])
    assert res.finished and res.reason == "stop"
    assert res.accepted == cut - 1 and res.next_token == stop
    assert res.suggested_k == 0
    assert o.session_id not in engine.blocks  # finished: KV returned at once
    engine.close(o.session_id)


def test_length_limit_clips_drafts(engine, hf_models):
    prompt = [40, 41]
    ref = hf_greedy(hf_models["gqa"], prompt, 3)
    o = engine.open_session(prompt, GREEDY, max_new_tokens=3, stream=0)
    # Six good drafts, but only two more tokens fit: one accepted draft plus the next token.
    drafts = np.array([*ref[1:], 5, 5, 5, 5])
    (res,) = engine.verify([VerifyRound(o.session_id, 1, len(prompt) + 1, drafts)])
    assert (res.accepted, res.next_token, res.finished, res.reason) == (1, ref[2], True, "length")
    engine.close(o.session_id)


def test_out_of_blocks_fails_only_that_session(tiny_model_dirs, hf_models):
    # 6 blocks of 4 tokens: the first session takes 5, the second cannot grow past its 1.
    eng = VerifierEngine(tiny_config(tiny_model_dirs["gqa"], num_blocks=6))
    ref = hf_greedy(hf_models["gqa"], list(range(3, 21)), 4)
    big = eng.open_session(list(range(3, 21)), GREEDY, max_new_tokens=4, stream=0)
    small = eng.open_session([7, 8, 9], GREEDY, max_new_tokens=20, stream=1)
    with pytest.raises(CapacityError, match="KV cache full"):
        eng.open_session(list(range(3, 12)), GREEDY, max_new_tokens=4, stream=2)
    r_big = VerifyRound(big.session_id, 1, 19, np.array(ref[1:2]))
    r_small = VerifyRound(small.session_id, 1, 4, np.array([5, 6, 7, 8]))
    res_big, res_small = eng.verify([r_big, r_small])
    assert "KV cache full" in res_small.error
    assert res_big.error is None and res_big.accepted == 1 and res_big.next_token == ref[2]
    assert eng.blocks.length(small.session_id) == 3  # untouched, can retry round 1 later


def test_max_sessions_and_bad_open_arguments(tiny_model_dirs):
    eng = VerifierEngine(tiny_config(tiny_model_dirs["gqa"], max_sessions=2))
    for bad in ([], [3, 96], [[1, 2]]):
        with pytest.raises(ValueError):
            eng.open_session(bad, GREEDY, max_new_tokens=4, stream=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.open_session([3], GREEDY, max_new_tokens=0, stream=0)
    with pytest.raises(ValueError, match="max_model_len"):
        eng.open_session([3] * 256, GREEDY, max_new_tokens=4, stream=0)
    a = eng.open_session([3], GREEDY, max_new_tokens=4, stream=0)
    eng.open_session([3], GREEDY, max_new_tokens=4, stream=0)
    with pytest.raises(CapacityError, match="session slots"):
        eng.open_session([3], GREEDY, max_new_tokens=4, stream=0)
    eng.close(a.session_id)
    eng.close(a.session_id)  # idempotent
    eng.open_session([3], GREEDY, max_new_tokens=4, stream=0)
    assert eng.stats().active_sessions == 2


def test_long_prompt_and_big_batches_split_into_bounded_forwards(tiny_model_dirs, hf_models):
    eng = VerifierEngine(tiny_config(tiny_model_dirs["gqa"], max_batch_tokens=12, max_k=4))
    prompts = [list(range(3, 43)), [50, 51, 52], [60, 61, 62, 63]]
    refs = [hf_greedy(hf_models["gqa"], p, 6) for p in prompts]
    opened = [eng.open_session(p, GREEDY, max_new_tokens=6, stream=0) for p in prompts]
    assert [o.first_token for o in opened] == [r[0] for r in refs]
    prefill = eng.drain_forwards()
    assert [f.tokens for f in prefill] == [12, 12, 12, 4, 3, 4]  # 40 tokens in chunks of 12
    rounds = [
        VerifyRound(o.session_id, 1, len(p) + 1, np.array(r[1:5]))
        for o, p, r in zip(opened, prompts, refs, strict=True)
    ]
    results = eng.verify(rounds)
    assert [(res.accepted, res.next_token) for res in results] == [(4, r[5]) for r in refs]
    # Three rounds of 5 tokens fit in forwards of at most 12 tokens only as 2 + 1.
    assert [(f.kind, f.sessions, f.tokens) for f in eng.drain_forwards()] == [
        ("verify", 2, 10),
        ("verify", 1, 5),
    ]
    stats = eng.stats()
    assert (stats.rounds_total, stats.draft_tokens_total, stats.accepted_tokens_total) == (
        3,
        12,
        12,
    )
    assert stats.forwards_total == 8 and stats.tokens_total == 47 + 15
