"""Draft model on onnxruntime-genai: one og.Model per backend, one og.Generator per session.

The generator's KV cache is the session state. Each propose() keeps the
longest common prefix of what the generator holds and the new history,
rewinds past it and feeds only the rest, so a round costs one chunked
forward for the newly committed tokens plus one forward per draft token.
The last draft token is never fed: if the verifier rejects it (the common
case) there is nothing to rewind, and if it is accepted it arrives in the
next history anyway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from sled_shared.models.registry import ModelEntry
from sled_shared.speculative import (
    Purpose,
    SamplingParams,
    draft_distribution,
    position_rng,
    sample,
)

from sled_drafter.backends.base import Draft, DraftBackend, DraftError, DraftSession, check_request

# Tokens a session can hold (history + draft). The KV cache is allocated for
# all of them up front (SmolLM2-135M: 46 KB per token), so this bounds memory.
DEFAULT_MAX_LENGTH = 2048
# Sampled drafts keep this many top tokens: small messages, exact rule.
DEFAULT_TOP_CAP = 32


class OrtGenaiSession(DraftSession):
    def __init__(self, model: og.Model, backend: OrtGenaiBackend) -> None:
        self._backend = backend
        params = og.GeneratorParams(model)
        # Search options matter only for the buffer size: tokens are chosen here, not by og.
        params.set_search_options(max_length=backend.max_length, do_sample=False)
        self._gen: og.Generator | None = og.Generator(model, params)
        self._held = np.empty(backend.max_length, dtype=np.int32)  # tokens in the KV cache
        self._count = 0
        self._logits: np.ndarray | None = None  # next-token logits after the held tokens

    def propose(self, history: Sequence[int], k: int, params: SamplingParams, stream: int) -> Draft:
        if self._gen is None:
            raise DraftError("ort-genai session is closed")
        backend = self._backend
        ids = check_request(history, k, params, stream, backend.vocab_size)
        k = int(k)
        n = ids.shape[0]
        if k == 0:
            return Draft(np.empty(0, dtype=np.int32), None if params.greedy else [])
        if n + k - 1 > backend.max_length:
            raise DraftError(
                f"history of {n} tokens + {k} draft tokens exceeds this drafter's "
                f"max_length {backend.max_length}"
            )
        logits = self._sync(ids)
        out = np.empty(k, dtype=np.int32)
        dists: list[tuple[np.ndarray, np.ndarray]] | None = None if params.greedy else []
        for i in range(k):
            row = logits.reshape(-1)
            if dists is None:
                token = int(row.argmax())
            else:
                q_ids, q_probs = draft_distribution(row, params, backend.top_cap)
                rng = position_rng(params.seed, int(stream), n + i, Purpose.DRAFT)
                token = sample(q_ids, q_probs, rng)
                dists.append((q_ids, q_probs))
            out[i] = token
            if i + 1 < k:
                logits = self._feed(out[i : i + 1])
        return Draft(out, dists)

    def _sync(self, ids: np.ndarray) -> np.ndarray:
        """Make the generator hold exactly `ids`; return the logits for the next token."""
        n = ids.shape[0]
        m = min(n, self._count)
        differ = np.flatnonzero(self._held[:m] != ids[:m])
        common = int(differ[0]) if differ.shape[0] else m
        if common == n == self._count and self._logits is not None:
            return self._logits
        # At least one token is fed so that fresh logits come out of the forward.
        keep = min(common, n - 1)
        if keep < self._count:
            self._rewind(keep)
        return self._feed(ids[keep:])

    def _rewind(self, length: int) -> None:
        assert self._gen is not None
        self._gen.rewind_to(length)
        self._count = length
        self._logits = None

    def _feed(self, tokens: np.ndarray) -> np.ndarray:
        assert self._gen is not None
        end = self._count + tokens.shape[0]
        try:
            self._gen.append_tokens(tokens)
        except RuntimeError:
            # og may have run part of the chunk; start from scratch next time.
            self._reset()
            raise
        self._held[self._count : end] = tokens
        self._count = end
        self._logits = self._gen.get_logits()
        return self._logits

    def _reset(self) -> None:
        assert self._gen is not None
        self._gen.rewind_to(0)
        self._count = 0
        self._logits = None

    @property
    def held(self) -> int:
        """How many tokens the generator's KV cache holds (for tests and metrics)."""
        return self._count

    def close(self) -> None:
        self._gen = None
        self._logits = None


class OrtGenaiBackend(DraftBackend):
    kind = "ort-genai"

    def __init__(
        self,
        model_dir: Path | str,
        max_length: int = DEFAULT_MAX_LENGTH,
        top_cap: int = DEFAULT_TOP_CAP,
        threads: int = 0,
    ) -> None:
        path = Path(model_dir)
        config_file = path / "genai_config.json"
        if not config_file.is_file():
            raise DraftError(f"{path} is no onnxruntime-genai model dir: genai_config.json missing")
        model_cfg = json.loads(config_file.read_text(encoding="utf-8"))["model"]
        self.vocab_size: int = int(model_cfg["vocab_size"])
        context = int(model_cfg.get("context_length", max_length))
        if not 2 <= max_length <= context:
            raise DraftError(f"max_length must be in [2, {context}] for {path}, got {max_length}")
        if top_cap < 1:
            raise DraftError(f"top_cap must be >= 1, got {top_cap}")
        if threads < 0:
            raise DraftError(f"threads must be >= 0 (0: onnxruntime's default), got {threads}")
        self.path = path
        self.max_length = max_length
        self.top_cap = top_cap
        config = og.Config(str(path))
        if threads:
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model: og.Model | None = og.Model(config)

    @classmethod
    def from_entry(cls, entry: ModelEntry, **options: int) -> OrtGenaiBackend:
        if entry.path is None:
            raise DraftError(f"model {entry.name!r} has no directory")
        return cls(entry.path, **options)

    def open_session(self) -> OrtGenaiSession:
        if self.model is None:
            raise DraftError(f"the ort-genai backend for {self.path} is closed")
        return OrtGenaiSession(self.model, self)

    def close(self) -> None:
        self.model = None
