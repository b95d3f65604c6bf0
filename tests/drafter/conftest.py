"""A tiny random Llama (HF weights + its onnxruntime-genai export + a small BPE tokenizer).

Built once in a subprocess (it needs torch and transformers, which the drafter
itself never imports) and kept in pytest's cache directory, keyed by a hash
of the recipe, so later runs start in milliseconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Larger than the usual 0.02 init so the logits have clear gaps: greedy
# comparisons across runtimes then do not hinge on float rounding.
RECIPE = r"""
import json, sys
from pathlib import Path
import torch, transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

out = Path(sys.argv[1])
hf = out / "hf"
specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
corpus = ["The quick brown fox jumps over the lazy dog. Héllo wörld, 你好世界 🙂 ok.",
          "Speculative decoding drafts tokens; the target verifies them in one pass."] * 40
trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
tok.train_from_iterator(corpus, trainer)
cfg = transformers.LlamaConfig(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.2)
torch.manual_seed(0)
transformers.LlamaForCausalLM(cfg).save_pretrained(hf)
tok.save(str(hf / "tokenizer.json"))
template = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
added = {str(i): {"content": c, "special": True, "lstrip": False, "rstrip": False,
                  "normalized": False, "single_word": False} for i, c in enumerate(specials)}
(hf / "tokenizer_config.json").write_text(json.dumps({
    "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>", "pad_token": "<|im_end|>",
    "chat_template": template, "model_max_length": 4096, "added_tokens_decoder": added}))
"""


def _build(dest: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        run = dict(check=True, capture_output=True, text=True, timeout=300, env=env)
        try:
            subprocess.run([sys.executable, "-c", RECIPE, str(work)], **run)
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "onnxruntime_genai.models.builder",
                    "-i",
                    str(work / "hf"),
                    "-o",
                    str(work / "ort"),
                    "-p",
                    "fp32",
                    "-e",
                    "cpu",
                    "-c",
                    str(work / "cache"),
                ],
                **run,
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"building the tiny model failed:\n{exc.stderr[-3000:]}") from exc
        shutil.rmtree(work / "cache", ignore_errors=True)
        try:
            work.rename(dest)
        except OSError:
            if not (dest / "ort" / "genai_config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Directory with `hf/` (transformers weights + tokenizer) and `ort/` (og export)."""
    key = hashlib.sha256(RECIPE.encode()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    root = cache.mkdir("sled_drafter_tiny") if cache else tmp_path_factory.mktemp("tiny")
    dest = Path(root) / key
    if not (dest / "ort" / "genai_config.json").is_file():
        _build(dest)
    return dest
