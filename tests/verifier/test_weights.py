"""Model support checks when reading a HF config."""

from __future__ import annotations

import pytest
from sled_verifier.weights import read_spec
from transformers import LlamaConfig, MistralConfig, Qwen2Config

_TINY = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (MistralConfig(**_TINY), "not supported"),
        (Qwen2Config(**_TINY, use_sliding_window=True, sliding_window=8), "sliding-window"),
        (LlamaConfig(**_TINY, hidden_act="gelu"), "activation"),
        (
            LlamaConfig(
                **_TINY, rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}
            ),
            "rope type",
        ),
    ],
)
def test_unsupported_models_are_named(tmp_path, config, match):
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        read_spec(tmp_path)


def test_spec_of_a_gqa_model_with_eos_list(tmp_path):
    LlamaConfig(**_TINY, eos_token_id=[2, 7], max_position_embeddings=64).save_pretrained(tmp_path)
    _, spec = read_spec(tmp_path)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 1, 8)
    assert spec.eos_token_ids == (2, 7)
    assert spec.max_positions == 64 and spec.inv_freq.shape == (4,)
