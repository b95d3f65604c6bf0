"""Token ids -> text with stop strings: cut exactly before the stop, tokens after it dropped."""

import pytest
from sled_drafter.text_output import MAX_STOP_STRINGS, TextOutput, check_stops
from sled_drafter.tokenizer import Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Héllo wörld, 你好世界 🙂 ok."


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return Tokenizer.from_dir(tiny_model_dir / "hf")


def _run(tok, ids, stops, chunk=3):
    out = TextOutput.new(tok, stops)
    pieces = []
    for i in range(0, len(ids), chunk):
        pieces.append(out.push(ids[i : i + chunk]))
        if out.stopped:
            break
    pieces.append(out.finish())
    assert "".join(pieces) == out.text
    return out, pieces


@pytest.mark.parametrize("chunk", [1, 2, 5, 100])
def test_without_stops_the_pieces_make_the_full_decode(tok, chunk):
    ids = tok.encode(TEXT)
    out, _ = _run(tok, ids, (), chunk)
    assert out.text == tok.decode(ids) and out.token_ids == ids and not out.stopped


@pytest.mark.parametrize("stop", ["fox", "lazy dog", "世界", "🙂", "ö"])
@pytest.mark.parametrize("chunk", [1, 4])
def test_text_ends_right_before_the_stop_and_later_tokens_are_dropped(tok, stop, chunk):
    ids = tok.encode(TEXT)
    out, _ = _run(tok, ids, (stop,), chunk)
    full = tok.decode(ids)
    assert out.stopped
    assert out.text == full[: full.index(stop)]
    # The kept tokens are the shortest prefix whose text holds the stop string.
    kept = out.token_ids
    assert kept == ids[: len(kept)]
    assert stop in tok.decode(kept) and stop not in tok.decode(kept[:-1])


def test_the_earliest_of_several_stops_wins(tok):
    ids = tok.encode(TEXT)
    out, _ = _run(tok, ids, ("dog", "quick", "zzz"))
    assert out.text == "The "


def test_a_partial_stop_is_held_back_then_released(tok):
    ids = tok.encode("over the lazy cat")
    out = TextOutput.new(tok, ("lazy dog",))
    released = ""
    for t in ids:
        released += out.push([t])
        # Nothing that could still become "lazy dog" has left the building.
        assert not released.endswith(("lazy", "lazy ", "l", "la"))
    released += out.finish()
    assert released == "over the lazy cat" and not out.stopped


def test_pushes_after_a_stop_are_ignored(tok):
    out = TextOutput.new(tok, ("fox",))
    out.push(tok.encode("the fox"))
    n = len(out.token_ids)
    assert out.stopped and out.push(tok.encode(" more text")) == "" and out.finish() == ""
    assert len(out.token_ids) == n and out.text == "the "


def test_stop_list_is_checked():
    assert check_stops(["a", "b", "a"]) == ("a", "b")
    with pytest.raises(ValueError):
        check_stops([""])
    with pytest.raises(ValueError):
        check_stops(["x"] * (MAX_STOP_STRINGS + 1))


def test_ids_past_the_tokenizer_count_but_have_no_text(tok):
    ids = tok.encode("the fox")
    out = TextOutput.new(tok)
    pad = tok.vocab_size + 5  # a padded model vocabulary row no token uses
    text = out.push([ids[0], pad, *ids[1:]]) + out.finish()
    assert text == "the fox" and out.token_ids == [ids[0], pad, *ids[1:]]
