"""VerifierEngine: sessions, batched verification rounds, commit and rollback.

Invariant per session: `tokens` holds every committed token and the KV cache
holds all of them but the newest. A round feeds [newest] + drafts (K + 1
tokens), reads K + 1 logit rows, then truncates the KV to the accepted prefix.
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sled_shared.speculative import (
    Purpose,
    SamplingParams,
    position_rng,
    sample,
    target_probs,
    verify_greedy,
    verify_sampling,
)

from .block_manager import BlockManager, OutOfBlocksError
from .checks import (
    check_open,
    cut_at_stop,
    feedable_drafts,
    finish_reason,
    round_error,
    token_ids,
)
from .config import EngineConfig
from .counters import Counters
from .host_tier import HostTierError
from .messages import (
    CapacityError,
    EngineStats,
    ForwardStat,
    OpenResult,
    RoundResult,
    VerifyRound,
)
from .model_runner import ModelRunner, SeqRequest
from .session import Session, suggest_k
from .tiered_kv import TieredKV

__all__ = [
    "CapacityError",
    "EngineConfig",
    "EngineStats",
    "ForwardStat",
    "OpenResult",
    "RoundResult",
    "VerifierEngine",
    "VerifyRound",
]


@dataclass(slots=True)
class _Pending:
    """A round that passed validation and has KV allocated for its K + 1 tokens."""

    index: int  # position in the caller's list
    round: VerifyRound
    session: Session
    k: int  # drafts fed (the round's K, clipped to what can still be committed)


class VerifierEngine:
    """Not reentrant on its own: a lock serialises callers (the service runs it in a thread)."""

    def __init__(self, config: EngineConfig) -> None:
        if config.max_batch_tokens < config.max_k + 1:
            raise ValueError("max_batch_tokens must hold at least one round of max_k + 1 tokens")
        self.config = config
        self.runner = ModelRunner(config)
        self.spec = self.runner.spec
        self.blocks = BlockManager(self.runner.num_blocks, config.block_size)
        # Every KV operation goes through `kv`: a session may live on a kvoffload worker.
        self.kv = TieredKV(self.blocks, self.runner.kv_cache, self.runner.attention)
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self.counters = Counters()

    # ----------------------------------------------------------------- sessions

    def open_session(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        max_new_tokens: int,
        stream: int,
        stop_token_ids: Sequence[int] | None = None,
        resume: bool = False,
    ) -> OpenResult:
        """Prefill the prompt and produce the first token (Purpose.FIRST at len(prompt)).

        With `resume` (failover) the prompt is a session's whole committed
        history: all but its last token are prefilled, nothing is sampled, the
        last token is the newest committed one (returned as first_token), and
        max_new_tokens counts what remains to generate after it.
        """
        prompt = token_ids(prompt_ids, "prompt", self.spec.vocab_size)
        check_open(prompt, resume, self.config.max_model_len, max_new_tokens, stream)
        stops = token_ids(stop_token_ids or [], "stop_token_ids", self.spec.vocab_size)
        with self._lock:
            live = sum(not s.finished for s in self._sessions.values())
            if live >= self.config.max_sessions:
                raise CapacityError(f"all {self.config.max_sessions} session slots are in use")
            sid = uuid.uuid4().hex
            fed = prompt[:-1] if resume else prompt
            try:
                self.kv.add(sid, self.kv.open_tier(fed.size + self.config.max_k + 1))
                logits = self._prefill(sid, fed)
                failed = self.kv.flush().get(sid)
                if failed:
                    raise HostTierError(failed)
            except (OutOfBlocksError, HostTierError) as exc:
                self.kv.free(sid)
                raise CapacityError(str(exc)) from None
            except BaseException:
                self.kv.free(sid)
                raise
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            if resume:
                first = int(prompt[-1])
                prompt = prompt[:-1]
                # The history's last token counts as generated, so one more is allowed.
                max_new_tokens += 1
            elif params.greedy:
                first = int(np.argmax(logits))
            else:
                rng = position_rng(seed, stream, prompt.size, Purpose.FIRST)
                first = sample(None, target_probs(logits[None], params)[0], rng)
            s = Session(
                session_id=sid,
                tokens=[*prompt.tolist(), first],
                prompt_len=int(prompt.size),
                params=params,
                seed=seed,
                stream=stream,
                max_new_tokens=max_new_tokens,
                stop_ids=frozenset(self.spec.eos_token_ids) | frozenset(stops.tolist()),
            )
            self._sessions[sid] = s
            self._check_finished(s)
            self._drop_old_finished()
            return OpenResult(sid, first, s.finished, s.reason)

    def close(self, session_id: str) -> bool:
        """Forget a session and free its KV; False (and nothing done) for an unknown id."""
        with self._lock:
            known = self._sessions.pop(session_id, None) is not None
            self.kv.free(session_id)
            return known

    def evict_idle(self, ttl_s: float) -> list[str]:
        """Close sessions untouched for more than ttl_s seconds; returns their ids."""
        now = time.monotonic()
        with self._lock:
            idle = [s.session_id for s in self._sessions.values() if now - s.last_used > ttl_s]
        for sid in idle:
            self.close(sid)
        return idle

    # ------------------------------------------------------------------- rounds

    def verify(
        self,
        rounds: Sequence[VerifyRound],
        load: float = 0.0,
        sub_batch: Mapping[str, int] | None = None,
    ) -> list[RoundResult]:
        """Verify every round in one batched forward (more only past max_batch_tokens).

        `load` (0..1, the server's busyness) shrinks the suggested K toward 0.
        `sub_batch` (session -> 0 or 1, unlisted: 0) splits each forward into two
        sub-batches pipelined per layer (a PIPELINED plan); None runs one batch.
        """
        if not 0.0 <= load <= 1.0:
            raise ValueError(f"load must be in [0, 1], got {load}")
        results: list[RoundResult | None] = [None] * len(rounds)
        with self._lock:
            pending = self._admit(rounds, results)
            try:
                logits = self._forward_rounds(pending, sub_batch)
            finally:
                failed = self.kv.flush()
            for p, rows in zip(pending, logits, strict=True):
                why = failed.get(p.session.session_id)
                if why is None:
                    results[p.index] = self._finish_round(p, rows.numpy(), load)
                else:
                    results[p.index] = RoundResult.failed(p.round, why, "unknown_session")
            failed.update(self.kv.flush())  # rollbacks the finished rounds queued
            for sid in failed:
                # Its KV is lost: the drafter resumes it (elsewhere) from its history.
                self._sessions.pop(sid, None)
                self.kv.free(sid)
        return results  # type: ignore[return-value]  # every slot is filled above

    def _admit(
        self, rounds: Sequence[VerifyRound], results: list[RoundResult | None]
    ) -> list[_Pending]:
        pending: list[_Pending] = []
        seen: set[str] = set()
        for i, r in enumerate(rounds):
            s = self._sessions.get(r.session_id)
            if s is None:
                results[i] = RoundResult.failed(
                    r, f"unknown session {r.session_id!r}", "unknown_session"
                )
                continue
            s.last_used = time.monotonic()
            if r.session_id in seen:
                results[i] = RoundResult.failed(r, "session appears twice in one batch")
                continue
            seen.add(r.session_id)
            if r.round == s.last_round and s.last_result is not None:
                results[i] = s.last_result  # a retry: answer again, never advance twice
                continue
            error = round_error(s, r, self.config.max_k, self.spec.vocab_size)
            if error:
                results[i] = RoundResult.failed(r, error)
                continue
            k = feedable_drafts(s, r, self.config.max_model_len)
            try:
                self.kv.allocate(s.session_id, k + 1)
            except OutOfBlocksError as exc:
                results[i] = RoundResult.failed(r, str(exc), "at_capacity")
                continue
            pending.append(_Pending(i, r, s, k))
        return pending

    def _forward_rounds(
        self, pending: list[_Pending], sub_batch: Mapping[str, int] | None
    ) -> list[torch.Tensor]:
        reqs = [
            SeqRequest(
                p.session.session_id,
                np.concatenate(([p.session.tokens[-1]], p.round.draft_ids[: p.k])),
                len(p.session.tokens) - 1,
                self.kv.block_table(p.session.session_id),
                range(p.k + 1),
            )
            for p in pending
        ]
        try:
            return self._run_packed(reqs, "verify", sub_batch)
        except BaseException:
            for p in pending:  # leave every session as it was before the round
                self.kv.truncate(p.session.session_id, len(p.session.tokens) - 1)
            raise

    def _finish_round(self, p: _Pending, logits: np.ndarray, load: float) -> RoundResult:
        s, r, k = p.session, p.round, p.k
        drafts = r.draft_ids[:k]
        try:
            if s.params.greedy:
                outcome = verify_greedy(drafts, logits)
            else:
                probs = target_probs(logits, s.params)
                dists = (r.draft_dists or [])[:k]
                outcome = verify_sampling(
                    drafts, dists, probs, s.seed, s.stream, start_position=len(s.tokens)
                )
        except ValueError as exc:
            self.kv.truncate(s.session_id, len(s.tokens) - 1)
            return RoundResult.failed(r, f"bad draft: {exc}")
        new = cut_at_stop([*drafts[: outcome.accepted].tolist(), outcome.next_token], s.stop_ids)
        s.tokens.extend(new)
        # KV keeps every committed token but the newest: [previous newest] + accepted drafts.
        self.kv.truncate(s.session_id, len(s.tokens) - 1)
        accepted = len(new) - 1
        s.observe(k, outcome.accepted)
        self.counters.round(k, accepted)
        self._check_finished(s)
        result = RoundResult(
            session_id=s.session_id,
            round=r.round,
            accepted=accepted,
            next_token=new[-1],
            finished=s.finished,
            reason=s.reason,
            suggested_k=0 if s.finished else suggest_k(s.accept_rate, self.config.max_k, load),
        )
        s.last_round, s.last_result = r.round, result
        return result

    # ------------------------------------------------------------------- tiers

    def live_sessions(self) -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if not s.finished]

    def migrate(self, session_id: str, dst: str) -> None:
        """Move a live session's KV to tier `dst` (OutOfBlocksError / HostTierError if not)."""
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None or s.finished:
                return
            # Without KV (RECOMPUTE), a prefill of its committed tokens but the newest rebuilds it.
            history = np.asarray(s.tokens[:-1], np.int64)
            self.kv.move(session_id, dst, lambda sid: self._prefill(sid, history))
            failed = self.kv.flush().get(session_id)
        if failed:
            self.close(session_id)
            raise HostTierError(failed)

    # ------------------------------------------------------------------ helpers

    def _prefill(self, sid: str, prompt: np.ndarray) -> np.ndarray:
        """Feed the prompt in chunks of max_batch_tokens; logits [V] of its last token."""
        step = self.config.max_batch_tokens
        for start in range(0, prompt.size, step):
            chunk = prompt[start : start + step]
            self.kv.allocate(sid, chunk.size)
            # Only the last chunk's last row predicts a token; earlier chunks just fill the KV.
            rows = [chunk.size - 1] if start + chunk.size == prompt.size else []
            req = SeqRequest(sid, chunk, start, self.kv.block_table(sid), rows)
            (logits,) = self._run_packed([req], "prefill")
        return logits[0].numpy()

    def _run_packed(
        self, reqs: list[SeqRequest], kind: str, sub_batch: Mapping[str, int] | None = None
    ) -> list[torch.Tensor]:
        """Run requests in as few forwards as max_batch_tokens allows; logits per request.

        With `sub_batch`, each forward runs its two sub-batches pipelined."""
        out: list[torch.Tensor] = []
        batch: list[SeqRequest] = []
        tokens = 0
        for req in [*reqs, None]:
            n = 0 if req is None else req.token_ids.shape[0]
            if batch and (req is None or tokens + n > self.config.max_batch_tokens):
                if sub_batch is None:
                    out.extend(self.runner.run(batch))
                else:
                    out.extend(self.runner.run_pipelined(batch, sub_batch))
                self.counters.forward(kind, self.runner.last_forward_s, len(batch), tokens)
                batch, tokens = [], 0
            if req is not None:
                batch.append(req)
                tokens += n
        return out

    def _check_finished(self, s: Session) -> None:
        s.reason = finish_reason(s, self.config.max_model_len)
        s.finished = s.reason is not None
        if s.finished:
            # Only the stored result is needed from here on; the KV goes back to the pool.
            self.kv.free(s.session_id)

    def _drop_old_finished(self) -> None:
        """Keep at most max_sessions finished records (for retries) until closed or evicted."""
        finished = [sid for sid, s in self._sessions.items() if s.finished]
        for sid in finished[: max(0, len(finished) - self.config.max_sessions)]:
            del self._sessions[sid]

    # ------------------------------------------------------------------ metrics

    def drain_forwards(self) -> list[ForwardStat]:
        """Forward records since the last drain (oldest dropped past a bound)."""
        with self._lock:
            return self.counters.drain()

    def stats(self) -> EngineStats:
        with self._lock:
            c = self.counters
            return EngineStats(
                active_sessions=sum(not s.finished for s in self._sessions.values()),
                sessions=len(self._sessions),
                kv_blocks_used=self.blocks.num_used,
                kv_blocks_total=self.blocks.num_blocks,
                forwards_total=c.forwards,
                forward_seconds_total=c.forward_seconds,
                tokens_total=c.tokens,
                rounds_total=c.rounds,
                draft_tokens_total=c.drafted,
                accepted_tokens_total=c.accepted,
            )
