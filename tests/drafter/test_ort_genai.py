"""The onnxruntime-genai backend on a tiny random Llama (see conftest.py)."""

from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
from sled_drafter.backends import DraftError, load_backend
from sled_drafter.backends.ort_genai import OrtGenaiBackend, OrtGenaiSession
from sled_shared.models.registry import ModelEntry
from sled_shared.speculative import (
    Purpose,
    SamplingParams,
    draft_distribution,
    position_rng,
    sample,
)

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
VOCAB = 512


@pytest.fixture(scope="module")
def backend(tiny_model_dir: Path) -> OrtGenaiBackend:
    return OrtGenaiBackend(tiny_model_dir / "ort", max_length=2048, top_cap=16)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(rng.integers(1, 40))).tolist() for _ in range(count)]


def og_greedy(model: og.Model, prompt: list[int], steps: int) -> list[int]:
    """onnxruntime-genai's own greedy loop (it stops early at the eos token)."""
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + steps)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def assert_same_draft(a, b) -> None:
    assert a.ids.tolist() == b.ids.tolist()
    assert (a.dists is None) == (b.dists is None)
    for (ids_a, p_a), (ids_b, p_b) in zip(a.dists or [], b.dists or [], strict=True):
        assert ids_a.tolist() == ids_b.tolist()
        np.testing.assert_allclose(p_a, p_b, rtol=1e-5, atol=1e-7)


def test_greedy_draft_is_the_models_own_greedy_continuation(backend):
    for prompt in prompts(6):
        with backend.open_session() as session:
            draft = session.propose(prompt, 20, GREEDY, stream=0)
        assert draft.ids.dtype == np.int32 and draft.ids.shape == (20,)
        assert draft.dists is None
        reference = og_greedy(backend.model, prompt, 20)
        assert len(reference) >= 1
        assert draft.ids[: len(reference)].tolist() == reference


def test_greedy_draft_matches_transformers_on_the_same_weights(backend, tiny_model_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_model_dir / "hf").eval()
    for prompt in prompts(4, seed=1):
        draft = backend.open_session().propose(prompt, 16, GREEDY, stream=0).ids.tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + draft])).logits[0, len(prompt) - 1 : -1]
        best = logits.argmax(-1).tolist()
        for i, (got, want) in enumerate(zip(draft, best, strict=True)):
            if got != want:
                # A near-tie broken differently by fp32 rounding in the two runtimes.
                gap = float(logits[i, want] - logits[i, got])
                assert gap < 1e-4, f"position {i}: draft {got}, transformers {want}, gap {gap}"


def test_rewind_after_divergence_equals_a_fresh_session(backend):
    rng = np.random.default_rng(3)
    base = rng.integers(3, VOCAB, size=30).tolist()
    session = backend.open_session()
    for params in (GREEDY, SAMPLED):
        session.propose(base, 8, params, stream=5)
        assert session.held == 30 + 7
        diverged = [*base[:10], 4, 5, 6, 7, 8]
        got = session.propose(diverged, 8, params, stream=5)
        assert session.held == len(diverged) + 7
        assert_same_draft(got, backend.open_session().propose(diverged, 8, params, stream=5))


def test_repeated_rewinds_follow_any_history(backend):
    """Random walk over histories: extend with accepted drafts, cut back, diverge, repeat."""
    rng = np.random.default_rng(4)
    session = backend.open_session()
    history = rng.integers(3, VOCAB, size=12).tolist()
    for step in range(40):
        params = GREEDY if step % 2 else SAMPLED
        k = int(rng.integers(0, 7))
        got = session.propose(history, k, params, stream=9)
        assert_same_draft(got, backend.open_session().propose(history, k, params, stream=9))
        move = rng.integers(0, 4)
        if move == 0:  # verifier accepted a prefix and sent a correction
            accepted = int(rng.integers(0, k + 1))
            history = history + got.ids[:accepted].tolist() + [int(rng.integers(3, VOCAB))]
        elif move == 1:  # all accepted plus a bonus token
            history = history + got.ids.tolist() + [int(rng.integers(3, VOCAB))]
        elif move == 2:  # a new request sharing only a prefix
            cut = int(rng.integers(1, len(history) + 1))
            history = history[:cut] + rng.integers(3, VOCAB, size=int(rng.integers(0, 5))).tolist()
        # move == 3: the same history again (a retried round)


def test_long_session_up_to_max_length(tiny_model_dir):
    backend = OrtGenaiBackend(tiny_model_dir / "ort", max_length=2048)
    session = backend.open_session()
    history = np.random.default_rng(5).integers(3, VOCAB, size=2040).tolist()
    first = session.propose(history[:1000], 4, GREEDY, 0)
    long = session.propose(history, 8, GREEDY, 0)  # 2040 + 8 - 1 fed: fits exactly
    assert session.held == 2047
    assert_same_draft(long, backend.open_session().propose(history, 8, GREEDY, 0))
    assert_same_draft(session.propose(history[:1000], 4, GREEDY, 0), first)
    with pytest.raises(DraftError, match="max_length 2048"):
        session.propose(history, 10, GREEDY, 0)


def test_sampling_is_reproducible_and_within_the_reported_support(backend):
    prompt = prompts(1, seed=6)[0]
    a = backend.open_session().propose(prompt, 6, SAMPLED, stream=1)
    b = backend.open_session().propose(prompt, 6, SAMPLED, stream=1)
    assert_same_draft(a, b)
    other_streams = [
        backend.open_session().propose(prompt, 6, SAMPLED, stream=s).ids.tolist()
        for s in range(2, 6)
    ]
    assert any(ids != a.ids.tolist() for ids in other_streams)
    assert a.dists is not None and len(a.dists) == 6
    for tok, (ids, probs) in zip(a.ids.tolist(), a.dists, strict=True):
        assert ids.dtype == np.int32 and probs.dtype == np.float64
        assert 1 <= ids.shape[0] <= 16 and len(set(ids.tolist())) == ids.shape[0]
        assert tok in ids.tolist() and probs[ids.tolist().index(tok)] > 0
        assert abs(probs.sum() - 1.0) < 1e-12


def test_drafts_are_sampled_exactly_from_the_reported_distribution(backend):
    """Over many seeds the first draft token's frequencies match the q it reports."""
    prompt = prompts(1, seed=7)[0]
    params = SamplingParams(temperature=1.5, seed=0)
    session = backend.open_session()
    first = session.propose(prompt, 1, params, stream=0)
    q_ids, q = first.dists[0]
    trials = 3000
    counts = dict.fromkeys(q_ids.tolist(), 0)
    for seed in range(trials):
        draft = session.propose(prompt, 1, SamplingParams(temperature=1.5, seed=seed), stream=0)
        counts[int(draft.ids[0])] += 1  # KeyError if it left the reported support
        np.testing.assert_allclose(draft.dists[0][1], q)
    observed = np.array([counts[t] for t in q_ids.tolist()], dtype=np.float64)
    expected = q * trials
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    # 16 cells, 15 degrees of freedom: P(chi2 > 37.7) = 0.001.
    assert chi2 < 37.7, (chi2, observed, expected)


def test_each_token_is_drawn_with_its_positions_draft_rng(backend):
    prompt = prompts(1, seed=9)[0]
    draft = backend.open_session().propose(prompt, 8, SAMPLED, stream=3)
    for i, (tok, (ids, probs)) in enumerate(zip(draft.ids.tolist(), draft.dists, strict=True)):
        rng = position_rng(SAMPLED.seed, 3, len(prompt) + i, Purpose.DRAFT)
        assert sample(ids, probs, rng) == tok


def test_reported_distribution_is_the_shared_draft_distribution(backend):
    prompt = prompts(1, seed=8)[0]
    draft = backend.open_session().propose(prompt, 1, SAMPLED, stream=0)
    params = og.GeneratorParams(backend.model)
    params.set_search_options(max_length=64)
    gen = og.Generator(backend.model, params)
    gen.append_tokens(np.array(prompt, dtype=np.int32))
    ids, probs = draft_distribution(gen.get_logits().reshape(-1), SAMPLED, 16)
    assert draft.dists[0][0].tolist() == ids.tolist()
    np.testing.assert_allclose(draft.dists[0][1], probs, rtol=1e-6)


def test_k_zero_and_bad_requests(backend):
    session = backend.open_session()
    empty = session.propose([5, 6], 0, SAMPLED, stream=0)
    assert empty.ids.shape == (0,) and empty.dists == []
    with pytest.raises(DraftError, match="outside"):
        session.propose([5, VOCAB], 2, GREEDY, 0)
    with pytest.raises(DraftError, match="non-empty"):
        session.propose([], 2, GREEDY, 0)
    with pytest.raises(DraftError, match="stream"):
        session.propose([5], 2, GREEDY, -1)
    with pytest.raises(DraftError, match="seed"):
        session.propose([5], 2, SamplingParams(temperature=0.5), 0)
    # A refused request leaves the session usable.
    assert_same_draft(
        session.propose([5, 6, 7], 3, GREEDY, 0),
        backend.open_session().propose([5, 6, 7], 3, GREEDY, 0),
    )
    session.close()
    with pytest.raises(DraftError, match="closed"):
        session.propose([5], 2, GREEDY, 0)


def test_load_backend_and_bad_model_dirs(tiny_model_dir, tmp_path):
    entry = ModelEntry("tiny", "draft", "ort-genai", tiny_model_dir / "ort")
    backend = load_backend(entry, max_length=128, threads=1)
    assert backend.kind == "ort-genai" and backend.max_length == 128
    session = backend.open_session()
    assert isinstance(session, OrtGenaiSession)
    assert len(session.propose([3, 4, 5], 4, GREEDY, 0)) == 4
    with pytest.raises(DraftError, match="bad options"):
        load_backend(entry, beam_width=4)
    with pytest.raises(DraftError, match="not a draft"):
        load_backend(ModelEntry("t", "target", "hf", tiny_model_dir / "hf"))
    with pytest.raises(DraftError, match=r"genai_config\.json missing"):
        OrtGenaiBackend(tmp_path)
    with pytest.raises(DraftError, match="max_length"):
        OrtGenaiBackend(tiny_model_dir / "ort", max_length=10**6)
    backend.close()
    with pytest.raises(DraftError, match="closed"):
        backend.open_session()
