"""Wire messages of the ``sled.v1`` subjects (see ``sled_shared.subjects``).

Every message is a msgpack map ``{"v": 1, "t": <type>, <fields>...}``. Token
ids and probabilities are packed numpy arrays (see ``sled_shared.wire``).
``decode`` raises ``ProtocolError`` (code ``bad_request`` or
``unsupported_version``) for anything it cannot turn into a valid message, so
a service answers bad input with an ``ErrorReply`` instead of crashing.

Fields are checked in ``__post_init__``: a message built locally is held to
the same rules as one received.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np

from sled_shared.speculative import SamplingParams
from sled_shared.wire import (
    ERROR_CODES,
    PROTOCOL_VERSION,
    ProtocolError,
    ServiceError,
    check_bool,
    check_float,
    check_ids,
    check_int,
    check_optional,
    check_probs,
    check_sparse_dists,
    check_str,
    pack,
    unpack,
)

__all__ = [
    "ERROR_CODES",
    "FINISH_REASONS",
    "PROTOCOL_VERSION",
    "ErrorReply",
    "Message",
    "ProtocolError",
    "ServiceError",
    "SessionClose",
    "SessionClosed",
    "SessionOpen",
    "SessionOpened",
    "VerifyRequest",
    "VerifyResponse",
    "decode",
    "encode",
]

FINISH_REASONS = frozenset({"stop", "length"})
_U64_MAX = (1 << 64) - 1

M = TypeVar("M", bound="Message")
_TYPES: dict[str, type[Message]] = {}


def message(type_tag: str):
    """Class decorator: registers a message dataclass under its wire type tag."""

    def register(cls: type[M]) -> type[M]:
        if type_tag in _TYPES:
            raise ValueError(f"message type {type_tag!r} registered twice")
        clash = {f.name for f in dataclasses.fields(cls)} & {"v", "t"}
        if clash:  # the envelope's own keys: such a field would overwrite them
            raise ValueError(f"message {type_tag!r} has reserved field names {sorted(clash)}")
        cls.TYPE = type_tag
        _TYPES[type_tag] = cls
        return cls

    return register


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and np.array_equal(a, b)
        )
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


class Message:
    """Base of all wire messages (slotted, frozen dataclasses)."""

    __slots__ = ()
    TYPE: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        return _fields_dict(self)

    @classmethod
    def from_wire(cls: type[M], body: dict[str, Any]) -> M:
        return _from_fields(cls, body)

    # Array fields make the dataclass-generated __eq__ ambiguous; compare them by value.
    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(
            _same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self)
        )


def _fields_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# Module functions rather than super(): zero-argument super() does not work in
# slotted dataclasses on Python 3.11.
def _from_fields(cls: type[M], body: dict[str, Any]) -> M:
    fields = dataclasses.fields(cls)
    unknown = body.keys() - {f.name for f in fields}
    if unknown:
        raise ProtocolError(f"{cls.TYPE}: unknown fields {sorted(unknown)}")
    missing = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in body
    ]
    if missing:
        raise ProtocolError(f"{cls.TYPE}: missing fields {missing}")
    return cls(**body)


def encode(msg: Message) -> bytes:
    return pack({"v": PROTOCOL_VERSION, "t": msg.TYPE, **msg.to_wire()})


def decode(data: bytes, expect: type[M] | tuple[type[Message], ...] | None = None) -> Message:
    """Decode one message; with ``expect``, any other message type is a ProtocolError."""
    body = unpack(data)
    if not isinstance(body, dict):
        raise ProtocolError(f"a message is a msgpack map, got {type(body).__name__}")
    version = body.pop("v", None)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ProtocolError("missing or invalid protocol version 'v'")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})",
            code="unsupported_version",
        )
    tag = body.pop("t", None)
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {tag!r}")
    if expect is not None and not issubclass(cls, expect):
        names = [t.TYPE for t in (expect if isinstance(expect, tuple) else (expect,))]
        raise ProtocolError(f"expected a {' or '.join(names)} message, got {tag!r}")
    try:
        return cls.from_wire(body)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{tag}: {exc}") from None


def _check_finish(finished: Any, reason: Any) -> bool:
    finished = check_bool("finished", finished)
    reason = check_optional("reason", reason, check_str, FINISH_REASONS)
    if finished != (reason is not None):
        raise ProtocolError(f"finished={finished} needs reason set exactly when finished")
    return finished


def _set(msg: Message, name: str, value: Any) -> None:
    object.__setattr__(msg, name, value)  # normalising a frozen dataclass's own fields


@message("session.open")
@dataclass(frozen=True, slots=True, eq=False)
class SessionOpen(Message):
    """Open a session: the verifier prefills ``prompt_ids`` and samples the first token.

    With ``resume`` (failover to another verifier) ``prompt_ids`` is the whole
    committed history: the verifier prefills it, samples nothing, and the
    session goes on from its last token; ``max_new_tokens`` is what remains.
    """

    prompt_ids: np.ndarray
    max_new_tokens: int
    draft_kind: str  # the drafter's model name, e.g. "smollm2-135m-int4" or "ngram"
    device_name: str
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: int = 0  # random-stream id chosen by the drafter; survives failover
    stop_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    resume: bool = False

    def __post_init__(self) -> None:
        prompt = check_ids("prompt_ids", self.prompt_ids)
        _set(self, "resume", check_bool("resume", self.resume))
        if prompt.size < (2 if self.resume else 1):
            raise ProtocolError(
                "a resumed history holds the prompt and at least one generated token"
                if self.resume
                else "prompt_ids must hold at least one token"
            )
        _set(self, "prompt_ids", prompt)
        _set(self, "max_new_tokens", check_int("max_new_tokens", self.max_new_tokens, 1))
        check_str("draft_kind", self.draft_kind)
        check_str("device_name", self.device_name)
        if not isinstance(self.params, SamplingParams):
            raise ProtocolError(f"params must be SamplingParams, got {type(self.params)}")
        _set(self, "stream", check_int("stream", self.stream, 0, _U64_MAX))
        _set(self, "stop_ids", check_ids("stop_ids", self.stop_ids))

    def to_wire(self) -> dict[str, Any]:
        body = _fields_dict(self)
        body["params"] = _fields_dict(self.params)
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> SessionOpen:
        params = body.get("params")
        if params is not None:
            if not isinstance(params, dict):
                raise ProtocolError("params must be a map")
            body = {**body, "params": SamplingParams(**params)}
        return _from_fields(cls, body)


@message("session.opened")
@dataclass(frozen=True, slots=True, eq=False)
class SessionOpened(Message):
    session_id: str
    verifier_id: str  # rounds go to subjects.verify(verifier_id)
    first_token: int
    finished: bool = False
    reason: str | None = None  # "stop" | "length" when finished

    def __post_init__(self) -> None:
        check_str("session_id", self.session_id)
        check_str("verifier_id", self.verifier_id)
        _set(self, "first_token", check_int("first_token", self.first_token))
        _set(self, "finished", _check_finish(self.finished, self.reason))


@message("verify.request")
@dataclass(frozen=True, slots=True, eq=False)
class VerifyRequest(Message):
    """One round: draft token i sits at absolute position ``committed_len + i``."""

    session_id: str
    round: int
    committed_len: int
    draft_ids: np.ndarray  # K may be 0: plain centralised decoding
    # Per draft token, the sparse distribution (ids int32, probs) it was sampled
    # from; None when the drafter decodes greedily.
    draft_dists: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None

    def __post_init__(self) -> None:
        check_str("session_id", self.session_id)
        _set(self, "round", check_int("round", self.round))
        _set(self, "committed_len", check_int("committed_len", self.committed_len, 1))
        draft = check_ids("draft_ids", self.draft_ids)
        _set(self, "draft_ids", draft)
        if self.draft_dists is not None:
            _set(self, "draft_dists", check_sparse_dists(draft, self.draft_dists))

    def to_wire(self) -> dict[str, Any]:
        body = _fields_dict(self)
        dists = body.pop("draft_dists")
        if dists is not None:
            # Flattened: three packed arrays instead of 2K small ones.
            body["dist_lens"] = np.array([len(ids) for ids, _ in dists], dtype=np.int32)
            body["dist_ids"] = np.concatenate([ids for ids, _ in dists] or [np.zeros(0, np.int32)])
            body["dist_probs"] = np.concatenate([p for _, p in dists] or [np.zeros(0)])
        return body

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> VerifyRequest:
        flat = [body.pop(k, None) for k in ("dist_lens", "dist_ids", "dist_probs")]
        if any(x is not None for x in flat):
            if any(x is None for x in flat):
                raise ProtocolError("dist_lens, dist_ids and dist_probs go together")
            lens = check_ids("dist_lens", flat[0])
            ids, probs = check_ids("dist_ids", flat[1]), check_probs("dist_probs", flat[2])
            if int(lens.sum()) != len(ids) or len(ids) != len(probs):
                raise ProtocolError("dist_lens do not add up to the dist_ids/dist_probs lengths")
            ends = np.cumsum(lens)
            bounds = zip((ends - lens).tolist(), ends.tolist(), strict=True)
            body["draft_dists"] = tuple((ids[a:b], probs[a:b]) for a, b in bounds)
        return _from_fields(cls, body)


@message("verify.response")
@dataclass(frozen=True, slots=True, eq=False)
class VerifyResponse(Message):
    session_id: str
    round: int
    accepted: int  # draft tokens accepted, 0..K
    next_token: int  # correction on a reject, bonus when all K were accepted
    finished: bool = False
    reason: str | None = None
    suggested_k: int = 0  # the K the verifier wants next round (0: no drafting)
    queue_s: float = 0.0  # time the round waited for its batch
    compute_s: float = 0.0  # the batch's forward + verification time
    batch_size: int = 0  # sessions in that batch; 0 for a repeated round answered from memory

    def __post_init__(self) -> None:
        check_str("session_id", self.session_id)
        for name in ("round", "accepted", "next_token", "suggested_k", "batch_size"):
            _set(self, name, check_int(name, getattr(self, name)))
        _set(self, "finished", _check_finish(self.finished, self.reason))
        _set(self, "queue_s", check_float("queue_s", self.queue_s))
        _set(self, "compute_s", check_float("compute_s", self.compute_s))


@message("session.close")
@dataclass(frozen=True, slots=True, eq=False)
class SessionClose(Message):
    session_id: str

    def __post_init__(self) -> None:
        check_str("session_id", self.session_id)


@message("session.closed")
@dataclass(frozen=True, slots=True, eq=False)
class SessionClosed(Message):
    session_id: str

    def __post_init__(self) -> None:
        check_str("session_id", self.session_id)


@message("error")
@dataclass(frozen=True, slots=True, eq=False)
class ErrorReply(Message):
    code: str  # one of ERROR_CODES
    message: str
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        check_str("code", self.code, ERROR_CODES)
        if not isinstance(self.message, str):
            raise ProtocolError(f"message must be a string, got {type(self.message).__name__}")
        _set(
            self, "retry_after_s", check_optional("retry_after_s", self.retry_after_s, check_float)
        )

    @classmethod
    def from_exception(cls, exc: ServiceError) -> ErrorReply:
        return cls(exc.code, exc.message, exc.retry_after_s)
