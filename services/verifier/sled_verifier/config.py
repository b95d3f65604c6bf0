"""Verifier engine configuration: one slotted dataclass, checked on construction."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(slots=True)
class EngineConfig:
    model_dir: Path | str
    device: str = "auto"  # auto | cpu | cuda; auto = cuda when available
    dtype: str = "auto"  # auto = fp32 on CPU, bf16 on CUDA; half types only on CUDA
    block_size: int = 16  # tokens per KV block
    num_blocks: int = 0  # KV budget in blocks; 0 = size from kv_memory_fraction
    kv_memory_fraction: float = 0.25  # of free device (or host) memory, when num_blocks == 0
    max_batch_tokens: int = 512  # new tokens per forward; longer prefills run in chunks
    max_sessions: int = 64
    max_model_len: int = 0  # 0 = the model's max_position_embeddings
    max_k: int = 8  # most draft tokens accepted per round
    # torch intra-op threads for this process; 0 = torch's default (all cores). On a CPU
    # shared with other busy processes, 1 avoids OpenMP threads waiting on each other.
    threads: int = 0
    torch_dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        self.model_dir = Path(self.model_dir).expanduser()
        cfg_path = self.model_dir / "config.json"
        if not cfg_path.is_file():
            raise ValueError(f"model_dir {self.model_dir} has no config.json (not a HF model dir)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but torch sees no CUDA device")
        if self.dtype == "auto":
            self.dtype = "bf16" if self.device == "cuda" else "fp32"
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {self.dtype!r}")
        self.torch_dtype = _DTYPES[self.dtype]
        # Half-precision matmuls on a CPU without AVX-512 run far below memory bandwidth.
        if self.device == "cpu" and self.torch_dtype != torch.float32:
            raise ValueError(f"dtype {self.dtype} is not supported on CPU; use fp32")
        _positive("block_size", self.block_size)
        _positive("max_batch_tokens", self.max_batch_tokens)
        _positive("max_sessions", self.max_sessions)
        _positive("max_k", self.max_k)
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ValueError(
                f"threads must be an int >= 0 (0 = torch default), not {self.threads!r}"
            )
        if self.num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0 (0 = auto), not {self.num_blocks}")
        if not 0.0 < self.kv_memory_fraction <= 0.95:
            raise ValueError(
                f"kv_memory_fraction must be in (0, 0.95], not {self.kv_memory_fraction}"
            )
        model_limit = _max_positions(cfg_path)
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be >= 0 (0 = model's), not {self.max_model_len}")
        if self.max_model_len == 0:
            self.max_model_len = model_limit
        elif self.max_model_len > model_limit:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's limit {model_limit}"
            )
        if self.max_model_len <= self.max_k + 1:
            raise ValueError(f"max_model_len {self.max_model_len} leaves no room for prompts")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, not {value!r}")


def _max_positions(cfg_path: Path) -> int:
    raw = json.loads(cfg_path.read_text())
    # Multimodal or nested configs keep the language model's settings under text_config.
    raw = raw.get("text_config", raw)
    limit = raw.get("max_position_embeddings")
    if not isinstance(limit, int) or limit <= 0:
        raise ValueError(f"{cfg_path} lacks a positive max_position_embeddings")
    return limit
