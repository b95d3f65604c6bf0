"""Text <-> token ids on the device, without transformers.

Loads a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json,
optionally chat_template.jinja and generation_config.json) with the
`tokenizers` library and renders chat templates with jinja2 the way
transformers' apply_chat_template does (same environment options, same
variables, rendered text encoded without added special tokens), so the device
produces the prompt ids the target model was trained on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_REPLACEMENT = "\ufffd"


class TokenizerError(ValueError):
    """A missing or malformed tokenizer file, or bad input to encode/render."""


def _token_text(value: Any) -> str | None:
    """tokenizer_config stores a special token as a string or as a serialised AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _pick_template(raw: Any, path: Path) -> str | None:
    # Older configs hold one string; newer ones a list of named templates.
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, Mapping)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(f"{path}: chat_template must be a string or a list with a 'default'")


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template refused the conversation: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters, which chat templates must not do.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template does not compile: {exc}") from exc


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise TokenizerError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TokenizerError(f"message {i} must be an object, got {type(msg).__name__}")
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"message {i}: role must be a non-empty string")
        if not isinstance(content, str):
            raise TokenizerError(f"message {i}: content must be a string")
        # transformers drops None-valued keys before rendering; so do we.
        out.append({key: val for key, val in msg.items() if val is not None})
    return out


@dataclass(slots=True)
class Tokenizer:
    inner: HFTokenizer
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template sees them
    chat_template: str | None
    stop_token_ids: tuple[int, ...]
    _template: jinja2.Template | None = field(default=None, repr=False)

    @classmethod
    def from_dir(cls, model_dir: Path | str) -> Tokenizer:
        path = Path(model_dir)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{path} has no tokenizer.json")
        try:
            inner = HFTokenizer.from_file(str(tok_file))
        except Exception as exc:  # the Rust side raises its own exception type
            raise TokenizerError(f"cannot load {tok_file}: {exc}") from exc
        cfg_file = path / "tokenizer_config.json"
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        special = {k: t for k in _SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None}
        template = _pick_template(config.get("chat_template"), cfg_file)
        jinja_file = path / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        stops: list[int] = []
        if "eos_token" in special:
            eos = inner.token_to_id(special["eos_token"])
            if eos is None:
                raise TokenizerError(f"eos_token {special['eos_token']!r} is not in the vocabulary")
            stops.append(eos)
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen_eos = _read_json(gen_file).get("eos_token_id")
            stops.extend(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else [])
        return cls(inner, special, template, tuple(dict.fromkeys(int(t) for t in stops)))

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return self.inner.token_to_id(eos) if eos is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a string, got {type(text).__name__}")
        return self.inner.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise TokenizerError(f"token ids must be in [0, {self.vocab_size})")
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """The prompt text for a conversation; `extra` reaches the template as variables."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat_template; send a plain prompt")
        if self._template is None:
            self._template = _compile(self.chat_template)
        context = {**self.special_tokens, **extra}
        return self._template.render(
            messages=_check_messages(messages),
            add_generation_prompt=add_generation_prompt,
            **context,
        )

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, **extra)
        # The template writes the special tokens itself, as transformers assumes.
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


@dataclass(slots=True)
class StreamDecoder:
    """Incremental detokenisation: text is released only once it is complete UTF-8.

    A character split over several byte tokens decodes to U+FFFD until its
    last byte arrives, so text ending in U+FFFD is held back. Each step
    decodes from one emitted chunk back, which keeps word-boundary spacing
    (leading-space markers) exactly as a full decode would render it.
    """

    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    _prefix: int = 0  # start of the context decoded along with the new ids
    _read: int = 0  # ids before this have been emitted

    def push(self, ids: Iterable[int]) -> str:
        """Add generated ids; return the newly completed text (maybe '')."""
        self.ids.extend(int(i) for i in ids)
        if self._read == len(self.ids):
            return ""
        seen = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        if text.endswith(_REPLACEMENT) or len(text) <= len(seen):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(seen) :]

    def flush(self) -> str:
        """Whatever is still held back (incomplete characters come out as U+FFFD)."""
        seen = self._decode(self.ids[self._prefix : self._read])
        text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return text[len(seen) :]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens) if ids else ""
