"""Tokenizer wrapper on the tiny BPE tokenizer (conftest.py); the real one is in integration."""

import json
import shutil
from pathlib import Path

import pytest
from sled_drafter.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, 你好世界 🙂 ok.",
    "🙂🙂 naïve café — ünïcödé ✓ 日本語 👍🏽 done",
    "  leading spaces and\nnew lines\t tabs",
]
CHATS = [
    [{"role": "user", "content": "Héllo 🙂, who are you?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me about <|im_end|> tokens."},
    ],
]


@pytest.fixture(scope="module")
def hf_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "hf"


@pytest.fixture(scope="module")
def tok(hf_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(hf_dir)


def test_encode_decode_round_trip(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_special_and_stop_tokens(tok):
    assert tok.eos_token_id == tok.inner.token_to_id("<|im_end|>") == 2
    # eos from tokenizer_config plus generation_config's eos_token_id (also 2): no duplicates.
    assert tok.stop_token_ids == (2,)
    assert tok.special_tokens["bos_token"] == "<|im_start|>"
    ids = tok.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def test_stream_decoder_emits_only_complete_characters(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        stream = tok.stream_decoder()
        pieces = [stream.push([i]) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_a_split_character(tok):
    emoji_ids = tok.encode("🙂")
    # The tiny BPE has no merge for the whole emoji, so it spans several byte tokens.
    prefix_ids = tok.encode("ok ")
    assert len(emoji_ids) > 1
    stream = tok.stream_decoder()
    assert stream.push(prefix_ids) == "ok "
    for i in emoji_ids[:-1]:
        assert stream.push([i]) == ""
    assert stream.push(emoji_ids[-1:]) == "🙂"
    # An unfinished character at the end comes out (as U+FFFD) only on flush.
    assert stream.push(emoji_ids[:1]) == ""
    assert stream.flush() == "\ufffd"


def test_stream_decoder_in_chunks_and_skipping_specials(tok):
    ids = [*tok.encode("Héllo wörld"), 2, *tok.encode(" 你好世界")]
    stream = tok.stream_decoder()
    out = "".join(stream.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) + stream.flush()
    assert out == tok.decode(ids) == "Héllo wörld 你好世界"


def test_chat_template_matches_transformers(tok, hf_dir):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for chat in CHATS:
        for add in (True, False):
            want = reference.apply_chat_template(chat, add_generation_prompt=add, tokenize=False)
            assert tok.render_chat(chat, add_generation_prompt=add) == want
            ids = reference.apply_chat_template(chat, add_generation_prompt=add, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert tok.apply_chat_template(chat, add_generation_prompt=add) == list(ids)


def test_chat_template_text(tok):
    text = tok.render_chat([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are tiny.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_bad_messages_are_refused(tok):
    for bad, match in [
        ([], "non-empty"),
        ("hello", "non-empty"),
        ([{"role": "user"}], "content must be a string"),
        ([{"content": "x"}], "role must be"),
        (["x"], "must be an object"),
    ]:
        with pytest.raises(TokenizerError, match=match):
            tok.apply_chat_template(bad)
    with pytest.raises(TokenizerError, match=r"token ids must be in"):
        tok.decode([tok.vocab_size])


def test_template_sources_and_errors(hf_dir, tmp_path):
    work = tmp_path / "tok"
    shutil.copytree(hf_dir, work, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg_path = work / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text())
    template = config.pop("chat_template")
    expected = Tokenizer.from_dir(hf_dir).render_chat(CHATS[0])

    cfg_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="no chat_template"):
        Tokenizer.from_dir(work).render_chat(CHATS[0])
    (work / "chat_template.jinja").write_text(template)
    assert Tokenizer.from_dir(work).render_chat(CHATS[0]) == expected

    named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
    cfg_path.write_text(json.dumps({**config, "chat_template": named}))
    assert Tokenizer.from_dir(work).render_chat(CHATS[0]) == expected

    refuse = "{{ raise_exception('roles must alternate') }}"
    cfg_path.write_text(json.dumps({**config, "chat_template": refuse}))
    with pytest.raises(TokenizerError, match="roles must alternate"):
        Tokenizer.from_dir(work).render_chat(CHATS[0])

    cfg_path.write_text(json.dumps({**config, "chat_template": "{% for %}"}))
    with pytest.raises(TokenizerError, match="does not compile"):
        Tokenizer.from_dir(work).render_chat(CHATS[0])

    (work / "tokenizer.json").unlink()
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(work)
