"""Load a Llama-family HF model directory through transformers into fused tensors.

transformers reads the config and the checkpoint (sharding, tied embeddings, key
names, dtype conversion); we then keep only the tensors our own forward pass
needs, with q/k/v and gate/up concatenated once so each layer runs two big
matmuls instead of five small ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
# Rope types whose frequencies do not depend on the current sequence length.
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    eos_token_ids: tuple[int, ...]
    inv_freq: torch.Tensor  # [head_dim // 2] float32
    rope_scale: float  # multiplies cos/sin (yarn's attention factor; 1.0 otherwise)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.num_heads} heads not divisible by {self.num_kv_heads} kv heads"
            )
        if self.inv_freq.shape != (self.head_dim // 2,):
            raise ValueError(
                "rope frequencies must cover the whole head_dim (partial rope unsupported)"
            )


@dataclass(slots=True)
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: torch.Tensor  # [(H + 2 * KV) * D, hidden]
    qkv_bias: torch.Tensor | None  # [(H + 2 * KV) * D]
    o: torch.Tensor  # [hidden, H * D]
    o_bias: torch.Tensor | None  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    gate_up: torch.Tensor  # [2 * I, hidden]
    gate_up_bias: torch.Tensor | None  # [2 * I]
    down: torch.Tensor  # [hidden, I]
    down_bias: torch.Tensor | None  # [hidden]


@dataclass(slots=True)
class ModelWeights:
    embed: torch.Tensor  # [V, hidden]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [V, hidden]; the same storage as embed when tied


def read_spec(model_dir: Path) -> tuple[PretrainedConfig, ModelSpec]:
    cfg = AutoConfig.from_pretrained(model_dir)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {cfg.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
        )
    if cfg.hidden_act != "silu":
        raise ValueError(f"activation {cfg.hidden_act!r} is not supported (only silu)")
    if getattr(cfg, "use_sliding_window", False):
        raise ValueError("sliding-window attention is not supported")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv_freq, rope_scale = _rope_frequencies(cfg, head_dim)
    spec = ModelSpec(
        model_type=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_attention_heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        vocab_size=cfg.vocab_size,
        rms_norm_eps=cfg.rms_norm_eps,
        max_positions=cfg.max_position_embeddings,
        eos_token_ids=_eos_ids(model_dir, cfg),
        inv_freq=inv_freq,
        rope_scale=rope_scale,
    )
    return cfg, spec


def load_weights(
    model_dir: Path, device: torch.device, dtype: torch.dtype
) -> tuple[ModelSpec, ModelWeights]:
    cfg, spec = read_spec(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=dtype)
    sd = hf.state_dict()
    del hf

    def get(name: str) -> torch.Tensor:
        return sd[name].to(device=device, dtype=dtype).contiguous()

    def cat(names: list[str]) -> torch.Tensor | None:
        present = [n in sd for n in names]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(f"checkpoint has only some of {names}")
        return torch.cat([sd[n] for n in names]).to(device=device, dtype=dtype).contiguous()

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{x}_proj" for x in "qkv"]
        mlp = [p + "mlp.gate_proj", p + "mlp.up_proj"]
        layers.append(
            LayerWeights(
                input_norm=get(p + "input_layernorm.weight"),
                qkv=cat([n + ".weight" for n in attn]),
                qkv_bias=cat([n + ".bias" for n in attn]),
                o=get(p + "self_attn.o_proj.weight"),
                o_bias=cat([p + "self_attn.o_proj.bias"]),
                post_norm=get(p + "post_attention_layernorm.weight"),
                gate_up=cat([n + ".weight" for n in mlp]),
                gate_up_bias=cat([n + ".bias" for n in mlp]),
                down=get(p + "mlp.down_proj.weight"),
                down_bias=cat([p + "mlp.down_proj.bias"]),
            )
        )
    embed = get("model.embed_tokens.weight")
    tied = getattr(cfg, "tie_word_embeddings", False) or "lm_head.weight" not in sd
    weights = ModelWeights(
        embed=embed,
        layers=layers,
        norm=get("model.norm.weight"),
        lm_head=embed if tied else get("lm_head.weight"),
    )
    if weights.embed.shape != (spec.vocab_size, spec.hidden_size):
        raise ValueError(f"embedding shape {tuple(weights.embed.shape)} does not match the config")
    return spec, weights


def _rope_frequencies(cfg: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in _STATIC_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported; supported: {_STATIC_ROPE_TYPES}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (base**exponents), 1.0
    # The scaled variants follow transformers' own formulas so positions stay bit-compatible.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, torch.device("cpu"))
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"rope attention factor {scale} is invalid")
    return inv_freq.float(), scale


def _eos_ids(model_dir: Path, cfg: PretrainedConfig) -> tuple[int, ...]:
    ids: set[int] = set()
    sources = [cfg.eos_token_id]
    if (Path(model_dir) / "generation_config.json").is_file():
        sources.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    for eos in sources:
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    return tuple(sorted(ids))
