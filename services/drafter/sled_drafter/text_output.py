"""Generated token ids -> released text, with the user's stop strings.

Tokens go through the incremental decoder one at a time, so when a stop
string appears the token that completed it is known and every later token
(committed in the same round) is dropped: the output is exactly the target's
own text cut before the stop string. Text that might be the start of a stop
string is held back until the next tokens settle it.

A model's vocabulary may be padded past the tokenizer's (rows no token
uses); such ids count as output but have no text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sled_drafter.tokenizer import StreamDecoder, Tokenizer

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def check_stops(stops: Sequence[str]) -> tuple[str, ...]:
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    for s in stops:
        if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
            raise ValueError(f"stop strings must be non-empty strings of <= {MAX_STOP_CHARS} chars")
    return tuple(dict.fromkeys(stops))


@dataclass(slots=True)
class TextOutput:
    decoder: StreamDecoder
    stops: tuple[str, ...] = ()
    vocab_size: int | None = None  # ids at or past it decode to nothing
    token_ids: list[int] = field(default_factory=list)  # tokens that count as output
    text: str = ""  # everything released so far
    stopped: bool = False  # a stop string was found; later tokens are ignored
    _held: str = ""  # decoded, not yet released: may begin a stop string

    @classmethod
    def new(cls, tokenizer: Tokenizer, stops: Sequence[str] = ()) -> TextOutput:
        return cls(tokenizer.stream_decoder(), check_stops(stops), tokenizer.vocab_size)

    def push(self, ids: Iterable[int]) -> str:
        """Take newly committed ids; return the text they release (maybe '')."""
        out = []
        for token in ids:
            if self.stopped:
                break
            self.token_ids.append(int(token))
            if self.vocab_size is not None and not 0 <= token < self.vocab_size:
                continue
            piece = self.decoder.push([token])
            if piece:
                out.append(self._release(piece))
        return self._emit(out)

    def finish(self) -> str:
        """The generation ended: release what is held (incomplete bytes become U+FFFD)."""
        if self.stopped:
            return ""
        out = [self._release(self.decoder.flush())]
        if not self.stopped:
            out.append(self._held)
            self._held = ""
        return self._emit(out)

    def _emit(self, parts: list[str]) -> str:
        released = "".join(parts)
        self.text += released
        return released

    def _release(self, piece: str) -> str:
        held = self._held + piece
        if not self.stops:
            self._held = ""
            return held
        cut = min((i for s in self.stops if (i := held.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return held[:cut]
        keep = self._stop_prefix_len(held)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of ``text`` that some stop string starts with."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
