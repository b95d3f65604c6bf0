"""Deterministic test drafters, so two runs of a session propose the same drafts.

Each draft depends only on the history before it (and, when sampling, on the
position-keyed Purpose.DRAFT stream), never on where a round starts or which
verifier answers: exactly what a real drafter guarantees across a failover.
"""

from __future__ import annotations

import numpy as np
import torch
from sled_shared.speculative import (
    Purpose,
    SamplingParams,
    draft_distribution,
    position_rng,
    sample,
)

# K per round, by the session's global round index (kept across a failover).
K_SCHEDULE = (3, 1, 4, 0, 2, 5, 2, 3)


def hf_greedy(hf_model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (stops at EOS, as the engine does)."""
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def greedy_drafts(reference: list[int], generated: int, k: int) -> np.ndarray:
    """The reference continuation with every third draft position corrupted,
    so rounds see both full acceptance and rejections."""
    drafts = list(reference[generated : generated + k])
    for i in range(len(drafts)):
        if (generated + i) % 3 == 2:
            drafts[i] = (drafts[i] + 1) % 96
    return np.array(drafts, dtype=np.int32)


class SamplingDrafter:
    """Drafts from the target's own distribution at another temperature (so p != q),
    as a sparse top-8, drawing with position_rng(seed, stream, position, DRAFT)."""

    def __init__(self, hf_model, params: SamplingParams, stream: int) -> None:
        self.hf = hf_model
        self.params = params
        self.draft_params = SamplingParams(temperature=1.4, seed=params.seed)
        self.stream = stream

    def propose(self, history: list[int], k: int) -> tuple[np.ndarray, list]:
        seq = list(history)
        ids: list[int] = []
        dists: list[tuple[np.ndarray, np.ndarray]] = []
        for _ in range(k):
            with torch.no_grad():
                logits = self.hf(torch.tensor([seq])).logits[0, -1].float().numpy()
            d_ids, d_probs = draft_distribution(logits, self.draft_params, 8)
            rng = position_rng(self.params.seed, self.stream, len(seq), Purpose.DRAFT)
            token = sample(d_ids, d_probs, rng)
            ids.append(token)
            dists.append((d_ids.astype(np.int32), d_probs.astype(np.float64)))
            seq.append(token)
        return np.array(ids, dtype=np.int32), dists


def scripted_case(kind: str, hf_model, prompt: list[int], max_new: int, stream: int):
    """(params, propose(history, k) -> (drafts, dists), greedy reference or None)."""
    if kind == "greedy":
        ref = hf_greedy(hf_model, prompt, max_new)

        def propose(history: list[int], k: int):
            return greedy_drafts(ref, len(history) - len(prompt), k), None

        return SamplingParams(), propose, ref
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    return params, SamplingDrafter(hf_model, params, stream).propose, None
