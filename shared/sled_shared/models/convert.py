"""Turn the GGUF file into the cached model formats.

Target: a Hugging Face dir (fp32 safetensors) loaded by the verifier.
Drafts: onnxruntime-genai dirs built by its model builder from that HF dir.
torch/transformers are imported inside the functions: sled_shared must
import on devices that only run a prepared cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from sled_shared.models.child import run_logged

DRAFT_PRECISIONS: tuple[str, ...] = ("int4", "int8")
# Tokenizer files every model dir carries; tokenizer_config.json holds the chat template.
TOKENIZER_FILES: tuple[str, ...] = ("tokenizer.json", "tokenizer_config.json")
TARGET_FILES: tuple[str, ...] = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    *TOKENIZER_FILES,
)
DRAFT_FILES: tuple[str, ...] = ("genai_config.json", "model.onnx", *TOKENIZER_FILES)
BUILDER_TIMEOUT_S = 1800.0


class ConvertError(RuntimeError):
    """A conversion step failed; the message names the step and its log."""


def build_target(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF model to fp32 and save it with its tokenizer as a HF dir."""
    import torch
    import transformers
    from transformers import AutoTokenizer, GenerationConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    loaded = LlamaForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # The weights are already dequantized; dropping the GGUF quantization record
    # makes a plain fp32 model that save_pretrained accepts.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = GenerationConfig.from_model_config(config)
    del loaded
    model.save_pretrained(out_dir)
    if not tokenizer.chat_template:
        raise ConvertError(f"{gguf_path.name} carries no chat template")
    # The GGUF does not record the context length for the tokenizer.
    tokenizer.model_max_length = config.max_position_embeddings
    # Keep the chat template inside tokenizer_config.json, where every consumer looks.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    missing = [f for f in TARGET_FILES if not (out_dir / f).is_file()]
    if missing:
        raise ConvertError(f"target conversion left out {missing} in {out_dir}")


def build_draft(
    target_dir: Path, out_dir: Path, precision: str, work_dir: Path, log_path: Path
) -> None:
    """Export the target with onnxruntime-genai's builder at `precision` (cpu)."""
    if precision not in DRAFT_PRECISIONS:
        raise ConvertError(f"draft precision {precision!r} not in {DRAFT_PRECISIONS}")
    # The builder is run as a process: its CLI is the documented entry point,
    # and its memory (a full fp32 copy plus the quantizer) is freed on exit.
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(target_dir), "-o", str(out_dir), "-p", precision, "-e", "cpu",
        "-c", str(work_dir),
    ]  # fmt: skip
    try:
        returncode = run_logged(cmd, log_path, BUILDER_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise ConvertError(
            f"the {precision} draft build took over {BUILDER_TIMEOUT_S:.0f}s (log: {log_path})"
        ) from exc
    if returncode != 0:
        raise ConvertError(
            f"building the {precision} draft failed with exit {returncode} (log: {log_path})"
        )
    copy_tokenizer(target_dir, out_dir)
    missing = [f for f in DRAFT_FILES if not (out_dir / f).is_file()]
    if missing:
        raise ConvertError(f"the {precision} draft build left out {missing} (log: {log_path})")


def copy_tokenizer(src_dir: Path, dst_dir: Path) -> None:
    """Give `dst_dir` the target's exact tokenizer files (one chat template, in the config)."""
    for name in TOKENIZER_FILES:
        shutil.copyfile(src_dir / name, dst_dir / name)
    # A separate template file would take precedence over the copied config's.
    (dst_dir / "chat_template.jinja").unlink(missing_ok=True)
