"""Real SmolLM2 drafts (int4, int8) and tokenizer from the prepared model cache."""

from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import pytest
from sled_drafter.backends import load_backend
from sled_drafter.backends.ort_genai import OrtGenaiBackend
from sled_drafter.tokenizer import Tokenizer
from sled_shared.models.registry import (
    DRAFT_INT4,
    DRAFT_INT8,
    ModelRegistryError,
    get_model,
    tokenizer_dir,
)
from sled_shared.speculative import SamplingParams

pytestmark = pytest.mark.integration

GREEDY = SamplingParams()
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "Héllo! 你好 🙂 Why is the sky blue?"},
        {"role": "assistant", "content": "Rayleigh scattering."},
        {"role": "user", "content": "  And at sunset?\n\tExplain."},
    ],
    [{"role": "user", "content": "Write `def f(x):\n    return x**2` in Rust."}],
]
# Measured (bench/sled_bench/draft_quality.py): int8 ~0.92-0.97, int4 ~0.66-0.70.
MIN_AGREEMENT = {DRAFT_INT8: 0.8, DRAFT_INT4: 0.5}


def _cached(fn, *args):
    try:
        return fn(*args)
    except ModelRegistryError as exc:
        pytest.skip(f"model cache not prepared: {exc}")


@pytest.fixture(scope="module")
def target_dir() -> Path:
    return _cached(tokenizer_dir)


@pytest.fixture(scope="module")
def tok(target_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(target_dir)


@pytest.fixture(scope="module", params=[DRAFT_INT4, DRAFT_INT8])
def draft(request) -> tuple[str, OrtGenaiBackend]:
    backend = load_backend(_cached(get_model, request.param))
    assert isinstance(backend, OrtGenaiBackend)
    yield request.param, backend
    backend.close()


def og_greedy(model: og.Model, chunks: list[list[int]], steps: int) -> list[int]:
    """onnxruntime-genai's own greedy loop after feeding `chunks` one append at a time.

    The chunking matters: these models quantise activations per call
    (accuracy_level 4), so a token's logits depend on which tokens shared its
    forward pass. A session that rewinds and appends is compared with a
    generator fed the same chunks.
    """
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=sum(map(len, chunks)) + steps)
    gen = og.Generator(model, params)
    for chunk in chunks:
        gen.append_tokens(np.array(chunk, dtype=np.int32))
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def test_chat_template_ids_equal_transformers(tok, target_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(target_dir)
    for chat in CHATS:
        for add in (True, False):
            want = reference.apply_chat_template(chat, add_generation_prompt=add, tokenize=True)
            want = list(want["input_ids"] if hasattr(want, "keys") else want)
            assert tok.apply_chat_template(chat, add_generation_prompt=add) == want
    for text in ("plain text", " leading space", "émoji 🙂 and 日本語", "<|im_start|>user"):
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == reference.decode(
            reference.encode(text), skip_special_tokens=True
        )
    assert tok.eos_token_id == reference.eos_token_id == 2
    assert 2 in tok.stop_token_ids


def test_draft_dirs_share_the_targets_tokenizer(tok):
    for name in (DRAFT_INT4, DRAFT_INT8):
        other = Tokenizer.from_dir(_cached(get_model, name).path)
        for chat in CHATS:
            assert other.apply_chat_template(chat) == tok.apply_chat_template(chat)


def test_stream_decoding_of_real_tokens(tok):
    text = "Héllo wörld! 你好世界 🙂👍🏽 naïve — ✓ done."
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push([i]) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_greedy_draft_equals_ort_genai_generate(draft, tok):
    name, backend = draft
    prompt = tok.apply_chat_template(CHATS[0])
    session = backend.open_session()
    got = session.propose(prompt, 24, GREEDY, stream=0)
    want = og_greedy(backend.model, [prompt], 24)
    assert got.ids[: len(want)].tolist() == want
    assert tok.decode(got.ids).strip(), name
    # Three drafts accepted, then a correction: the session rewinds its KV cache
    # to prompt + 3 drafts (it had fed 23) and appends the correction.
    accepted = got.ids[:3].tolist()
    correction = int(tok.encode(" London")[0])
    again = session.propose([*prompt, *accepted, correction], 8, GREEDY, stream=0)
    want = og_greedy(backend.model, [prompt, *([t] for t in accepted), [correction]], 8)
    assert again.ids[: len(want)].tolist() == want


def test_sampled_draft_reports_its_support(draft, tok):
    _, backend = draft
    prompt = tok.apply_chat_template(CHATS[1])
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=3)
    a = backend.open_session().propose(prompt, 8, params, stream=2)
    b = backend.open_session().propose(prompt, 8, params, stream=2)
    assert a.ids.tolist() == b.ids.tolist()
    assert a.dists is not None and len(a.dists) == 8
    for tok_id, (ids, probs) in zip(a.ids.tolist(), a.dists, strict=True):
        assert 1 <= len(ids) <= backend.top_cap and tok_id in ids.tolist()
        assert abs(probs.sum() - 1) < 1e-12 and np.all(probs > 0)


def test_greedy_agreement_with_the_target(draft, tok, target_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    name, backend = draft
    model = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    session = backend.open_session()
    hits = total = 0
    for chat in CHATS:
        prompt = tok.apply_chat_template(chat)
        with torch.no_grad():
            seq = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
        cont = seq[0, len(prompt) :].tolist()
        for j, want in enumerate(cont):
            hits += session.propose(prompt + cont[:j], 1, GREEDY, 0).ids.tolist() == [want]
            total += 1
    assert total >= 30
    assert hits / total >= MIN_AGREEMENT[name], (name, hits, total)
