"""Tiny random Llama-family models saved as HF dirs, and helpers to run them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sled_verifier.config import EngineConfig
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=256,
    # Larger than the default 0.02 so logits are spread out and argmax ties are rare.
    initializer_range=0.15,
    bos_token_id=1,
    eos_token_id=2,
)

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**_COMMON, num_attention_heads=4, num_key_value_heads=4),
    "gqa": lambda: LlamaConfig(
        **_COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "llama3-rope": lambda: LlamaConfig(
        **_COMMON,
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2-bias": lambda: Qwen2Config(**_COMMON, num_attention_heads=4, num_key_value_heads=2),
}


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    dirs = {}
    for i, (name, make) in enumerate(TINY_CONFIGS.items()):
        torch.manual_seed(1234 + i)
        model = AutoModelForCausalLM.from_config(make(), dtype=torch.float32)
        with torch.no_grad():
            # transformers zero-initialises biases; random ones make the bias path testable.
            for pname, param in model.named_parameters():
                if pname.endswith("bias"):
                    param.normal_(0.0, 0.3)
        path = root / name
        model.save_pretrained(path)
        dirs[name] = path
    return dirs


@pytest.fixture(scope="session")
def hf_models(tiny_model_dirs):
    """The transformers reference model for each tiny dir, loaded once."""
    return {
        name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for name, path in tiny_model_dirs.items()
    }


def tiny_config(path: Path, **overrides) -> EngineConfig:
    kw = dict(model_dir=path, device="cpu", num_blocks=64, block_size=4, max_sessions=8)
    kw.update(overrides)
    return EngineConfig(**kw)


def reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] logits of transformers' own forward over the whole sequence."""
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].float()
