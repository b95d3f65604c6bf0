"""EngineConfig checks its values on construction."""

from __future__ import annotations

import pytest
import torch
from sled_verifier.config import EngineConfig


def test_defaults_resolve_from_the_model(tiny_model_dirs):
    cfg = EngineConfig(model_dir=tiny_model_dirs["llama"], device="cpu")
    assert cfg.max_model_len == 256  # the tiny config's max_position_embeddings
    assert cfg.dtype == "fp32" and cfg.torch_dtype == torch.float32
    if not torch.cuda.is_available():
        assert EngineConfig(model_dir=tiny_model_dirs["llama"]).device == "cpu"


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"device": "tpu"}, "device"),
        ({"device": "cpu", "dtype": "bf16"}, "not supported on CPU"),
        ({"dtype": "int8"}, "dtype"),
        ({"block_size": 0}, "block_size"),
        ({"num_blocks": -1}, "num_blocks"),
        ({"max_k": 0}, "max_k"),
        ({"max_model_len": 100000}, "exceeds"),
        ({"kv_memory_fraction": 1.5}, "kv_memory_fraction"),
    ],
)
def test_bad_values_are_rejected(tiny_model_dirs, kw, match):
    kw.setdefault("device", "cpu")
    with pytest.raises(ValueError, match=match):
        EngineConfig(model_dir=tiny_model_dirs["llama"], **kw)


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"no config\.json"):
        EngineConfig(model_dir=tmp_path)
