"""The drafter's side of the verifier protocol: open, verify and close over NATS.

Each call has a timeout and sorts failures into three kinds the round loop
acts on: ``Lost`` (the verifier or its session is gone: fail over to another
one), errors the user caused (``BadRequest``), and capacity or outages
(``Unavailable`` with a Retry-After).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from nats.aio.client import Client
from sled_shared import bus, subjects
from sled_shared.protocol import (
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    VerifyRequest,
    VerifyResponse,
)

from sled_drafter.errors import BadRequest, Unavailable, UpstreamError

log = logging.getLogger(__name__)

# Waits between attempts to reach a verifier (none listening, or all busy).
RETRY_BASE_S = 0.05
RETRY_CAP_S = 1.0
CLOSE_TIMEOUT_S = 2.0
# Opens that time out before giving up (each may reach another verifier).
OPEN_TIMEOUTS = 3
# How many request timeouts a round may wait on a verifier that still holds
# its subscription (busy, or hung) before the session counts as lost.
VERIFY_PATIENCE = 2


class Lost(Exception):
    """The verifier or the session on it is gone; reopen elsewhere with the history."""


@dataclass(slots=True)
class VerifierLink:
    nc: Client
    timeout_s: float  # one request
    open_deadline_s: float  # all attempts to open (or resume) one session

    async def open(self, msg: SessionOpen) -> SessionOpened:
        """Open on whichever verifier the queue group picks. While none listens or all
        are full, retry until ``open_deadline_s``; a verifier that does not answer in
        time (hung, or busy) is tried OPEN_TIMEOUTS times, the queue group picking anew."""
        deadline = time.monotonic() + self.open_deadline_s
        delay = RETRY_BASE_S
        timeouts = 0
        while True:
            try:
                return await bus.request(
                    self.nc, subjects.SESSION_OPEN, msg, self.timeout_s, expect=SessionOpened
                )
            except bus.RemoteError as exc:
                if exc.code == "bad_request":
                    raise BadRequest(
                        f"the verifier refused the prompt: {exc.reply.message}"
                    ) from None
                if exc.code != "at_capacity":
                    raise UpstreamError(f"opening a session failed: {exc}") from None
                why = f"verifiers at capacity: {exc.reply.message}"
                delay = max(delay, exc.retry_after_s or 0.0)
            except bus.NoResponders:
                why = "no verifier is listening"
            except bus.RequestTimeout:
                timeouts += 1
                if timeouts < OPEN_TIMEOUTS:
                    continue
                raise Unavailable(
                    f"cannot open a session: no verifier answered within {self.timeout_s:g}s",
                    retry_after_s=1.0,
                ) from None
            except bus.BusError as exc:  # NATS connection closed or reconnecting
                why = str(exc)
            if time.monotonic() + delay >= deadline:
                raise Unavailable(f"cannot open a session: {why}", retry_after_s=1.0)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP_S)

    async def verify(self, verifier_id: str, req: VerifyRequest) -> VerifyResponse:
        """One round. A busy verifier (timeout, at_capacity) is asked again for the same
        round, which it answers once and only once, until VERIFY_PATIENCE timeouts have
        passed; a gone one (no responders, unknown session) is Lost at once."""
        subject = subjects.verify(verifier_id)
        deadline = time.monotonic() + VERIFY_PATIENCE * self.timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                resp = await bus.request(
                    self.nc,
                    subject,
                    req,
                    max(min(self.timeout_s, left), 0.1),
                    expect=VerifyResponse,
                )
            except bus.RequestTimeout:
                if time.monotonic() < deadline:
                    continue
                raise Lost(f"round {req.round}: no answer from {verifier_id}") from None
            except bus.RemoteError as exc:
                wait = min(max(exc.retry_after_s or RETRY_BASE_S, RETRY_BASE_S), RETRY_CAP_S)
                if exc.code == "at_capacity" and time.monotonic() + wait < deadline:
                    await asyncio.sleep(wait)
                    continue
                # unknown_session (evicted, or the verifier restarted) and anything
                # else it cannot answer are healed by a fresh session elsewhere.
                raise Lost(f"round {req.round} on {verifier_id}: {exc}") from None
            except bus.BusError as exc:  # no responders, or the connection is down
                raise Lost(f"round {req.round} on {verifier_id}: {exc}") from None
            if resp.session_id != req.session_id or resp.round != req.round:
                raise Lost(
                    f"{verifier_id} answered session {resp.session_id} round {resp.round} "
                    f"for session {req.session_id} round {req.round}"
                )
            if resp.accepted > len(req.draft_ids):
                raise UpstreamError(
                    f"{verifier_id} accepted {resp.accepted} of {len(req.draft_ids)} drafts"
                )
            return resp

    async def close(self, verifier_id: str, session_id: str) -> None:
        """Best effort: a verifier that misses it evicts the session after its TTL."""
        try:
            await bus.request(
                self.nc,
                subjects.session_close(verifier_id),
                SessionClose(session_id),
                CLOSE_TIMEOUT_S,
                expect=SessionClosed,
            )
        except bus.BusError as exc:
            log.debug("closing session %s on %s: %s", session_id, verifier_id, exc)
