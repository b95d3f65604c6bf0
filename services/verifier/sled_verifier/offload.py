"""Remote attention: host-tier sessions attend on a kvoffload worker's CPU.

One ``WorkerAttention`` per worker. Per layer the router hands it every
session of the batch (of each sub-batch, when a PIPELINED plan runs two
interleaved) that lives on that worker; it sends them as ONE
``kv.attend`` request (their new q/k/v; the worker appends k/v and attends
over the cache it holds) before the local sessions' attention runs, and the
forward collects the answer afterwards, so the worker's CPU attention
overlaps the accelerator's work (APEX's asynchronous overlap, per layer).

The engine runs on its own thread while NATS lives on the event loop: the
request is scheduled with ``run_coroutine_threadsafe`` and awaited through
its future with a timeout. A worker that fails or times out fails only its
own sessions: their rows get zeros for the rest of the forward (rows never
mix outside attention, so other sessions' logits are untouched) and the
engine turns them into error results.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import numpy as np
import torch
from sled_shared import bus
from sled_shared.apex.profiles import Component, Sample
from sled_shared.kv_client import AttendResult, KVClient, SessionTokens

from .attention import AttentionExecutor, Delegated, SeqSlice

# Samples kept for the local cost model and the scheduler; the oldest go first.
MAX_SAMPLES = 4096
# Failures that mean the worker is gone or stuck, not that it refused one request.
UNREACHABLE = (FutureTimeout, bus.NoResponders, bus.RequestTimeout)


class WorkerAttention(AttentionExecutor):
    def __init__(self, client: KVClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop
        # A layer's answer may take every retry of the client, plus scheduling slack.
        self.wait_s = client.timeout_s * (client.retries + 1) + 1.0
        self.forward_id = 0  # with the layer, names a request (and its retries) to the worker
        self.failed: dict[str, str] = {}  # session -> why, until the engine takes it
        self.last_rtt = 0.0  # round trip of the latest layer's request
        self.unreachable_at = -float("inf")  # when it last failed to answer at all
        self.samples: deque[Sample] = deque(maxlen=MAX_SAMPLES)

    @property
    def worker_id(self) -> str:
        return self.client.worker_id

    def take_failures(self) -> dict[str, str]:
        failed, self.failed = self.failed, {}
        return failed

    def attend(
        self, layer: int, seq: SeqSlice, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> torch.Tensor:
        return self.submit_many(layer, [Delegated(seq, q, k_new, v_new)])[0]()

    def submit_many(self, layer: int, work: list[Delegated]) -> list[Callable[[], torch.Tensor]]:
        # Each (sub-)batch's first layer takes a new id, so a request's (forward_id,
        # layer, session) never repeats outside its own retries.
        if layer == 0:
            self.forward_id += 1
        live = [w for w in work if w.seq.session_id not in self.failed]
        batch = [_tokens(w) for w in live]
        sent = time.perf_counter()
        future: Future | None = None
        if batch:
            coro = _attend(self.client, self.forward_id, layer, batch)
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        outputs: dict[str, np.ndarray] = {}
        state = {"collected": future is None}

        def collect() -> None:
            if state["collected"]:
                return
            state["collected"] = True
            assert future is not None
            try:
                res, done = future.result(timeout=self.wait_s)
            except Exception as exc:  # any failure fails these sessions only
                future.cancel()
                self.last_rtt = time.perf_counter() - sent
                if isinstance(exc, UNREACHABLE):
                    self.unreachable_at = time.monotonic()
                why = "no answer in time" if isinstance(exc, FutureTimeout) else str(exc)
                for w in live:
                    self.failed[w.seq.session_id] = f"KV worker {self.worker_id}: {why}"
                return
            self.last_rtt = done - sent
            outputs.update(zip((t.session for t in batch), res.outputs, strict=True))
            self._sample(batch, res, done - sent)

        def waiter(w: Delegated) -> Callable[[], torch.Tensor]:
            def wait() -> torch.Tensor:
                collect()
                out = outputs.get(w.seq.session_id)
                n, h, d = w.q.shape
                if out is None:  # failed: the engine discards this session's logits
                    return w.q.new_zeros(n, h * d)
                return torch.tensor(out.reshape(n, h * d), dtype=w.q.dtype, device=w.q.device)

            return wait

        return [waiter(w) for w in work]

    def _sample(self, batch: list[SessionTokens], res: AttendResult, rtt: float) -> None:
        tokens = sum(t.k.shape[0] for t in batch)
        context = sum(t.start_pos + t.k.shape[0] for t in batch)
        q_row = batch[0].q[0].size if batch[0].q is not None else 0
        # q, k, v out and the attention output back, float32 on the wire.
        nbytes = 4 * tokens * (2 * q_row + 2 * batch[0].k[0].size)
        if res.compute_s > 0:
            self.samples.append(
                Sample(Component.CPU_ATTN, res.compute_s, tokens, context, len(batch))
            )
        # What the round trip cost beyond the worker's own compute: the wire both ways,
        # encoding, and the hop between threads.
        self.samples.append(
            Sample(Component.TRANSFER, max(rtt - res.compute_s, 1e-6), nbytes=nbytes)
        )


def _tokens(w: Delegated) -> SessionTokens:
    n = w.seq.num_new

    def host(x: torch.Tensor) -> np.ndarray:
        return x.detach().to("cpu", torch.float32).contiguous().numpy()

    return SessionTokens(
        w.seq.session_id, w.seq.context_len - n, host(w.k_new), host(w.v_new), host(w.q)
    )


async def _attend(
    client: KVClient, forward_id: int, layer: int, batch: list[SessionTokens]
) -> tuple[AttendResult, float]:
    res = await client.attend(forward_id, layer, batch)
    return res, time.perf_counter()
