"""What a generation is asked for, what it measures, and the device settings
the session runner works with."""

from __future__ import annotations

from dataclasses import dataclass

from sled_shared.speculative import SamplingParams


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    params: SamplingParams  # seed always set: the caller picks one when the user gave none
    stream: int = 0  # keys the random draws together with the seed
    # The user chose the seed: the same request must give the same text (see adaptive_k).
    seeded: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.params.seed is None:
            raise ValueError("params.seed must be set")


@dataclass(slots=True)
class GenerationStats:
    started: float  # request arrival (perf_counter)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    failovers: int = 0
    verifier_id: str = ""
    first_token_at: float | None = None
    last_token_at: float | None = None
    generated: int = 0
    draft_s: float = 0.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def ttft_s(self) -> float:
        return (self.first_token_at or self.started) - self.started

    @property
    def tpot_s(self) -> float:
        if self.generated < 2 or self.first_token_at is None or self.last_token_at is None:
            return 0.0
        return (self.last_token_at - self.first_token_at) / (self.generated - 1)


@dataclass(slots=True)
class DrafterConfig:
    device_name: str
    draft_model: str
    max_k: int
    request_timeout_s: float
    context_len: int  # most tokens (prompt + generated) a session may hold
