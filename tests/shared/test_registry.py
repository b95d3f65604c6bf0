"""Model registry: entries, validation of user dirs, atomic file, error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sled_shared.models import registry
from sled_shared.models.registry import (
    DEFAULT_TARGET,
    DRAFT_INT4,
    NGRAM,
    ModelEntry,
    ModelRegistryError,
    get_model,
    load_registry,
    register_model,
    tokenizer_dir,
)


def make_hf_dir(path: Path, weights: str = "model.safetensors", tokenizer: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / weights).write_bytes(b"\0" * 16)
    if tokenizer:
        (path / "tokenizer.json").write_text("{}")
    return path


def make_genai_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "genai_config.json").write_text("{}")
    return path


def test_empty_cache_has_only_ngram(tmp_path: Path) -> None:
    entries = load_registry(tmp_path)
    assert entries == {NGRAM: ModelEntry(NGRAM, "draft", "ngram", None)}
    assert not (tmp_path / registry.REGISTRY_FILE).exists()


def test_register_and_get_hf_target(tmp_path: Path) -> None:
    model = make_hf_dir(tmp_path / "mine")
    entry = register_model("mine", "target", "hf", model, tmp_path / "cache")
    assert entry == ModelEntry("mine", "target", "hf", model.resolve())
    assert get_model("mine", tmp_path / "cache") == entry
    data = json.loads((tmp_path / "cache" / "registry.json").read_text())
    assert data == {
        "version": 1,
        "models": {"mine": {"role": "target", "kind": "hf", "path": str(model.resolve())}},
    }
    # ngram never goes to the file yet is always listed.
    assert set(load_registry(tmp_path / "cache")) == {"mine", NGRAM}


def test_register_keeps_other_entries_and_replaces_same_name(tmp_path: Path) -> None:
    a = make_hf_dir(tmp_path / "a")
    b = make_genai_dir(tmp_path / "b")
    c = make_genai_dir(tmp_path / "c")
    register_model("a", "target", "hf", a, tmp_path)
    register_model("b", "draft", "ort-genai", b, tmp_path)
    register_model("b", "draft", "ort-genai", c, tmp_path)
    entries = load_registry(tmp_path)
    assert entries["a"].path == a.resolve()
    assert entries["b"].path == c.resolve()
    assert len(entries) == 3


def test_pytorch_bin_weights_are_accepted(tmp_path: Path) -> None:
    model = make_hf_dir(tmp_path / "bin", weights="pytorch_model.bin")
    assert register_model("bin", "target", "hf", model, tmp_path).kind == "hf"


@pytest.mark.parametrize(
    ("setup", "kind", "expected"),
    [
        (lambda p: p.mkdir(), "hf", "config.json missing"),
        (lambda p: (p.mkdir(), (p / "config.json").write_text("{}")), "hf", "no weights"),
        (lambda p: make_hf_dir(p), "ort-genai", "genai_config.json missing"),
        (lambda p: None, "hf", "does not exist"),
    ],
)
def test_register_rejects_bad_dirs(tmp_path: Path, setup, kind: str, expected: str) -> None:
    model = tmp_path / "m"
    setup(model)
    with pytest.raises(ModelRegistryError, match=expected):
        register_model("m", "draft", kind, model, tmp_path / "cache")
    assert not (tmp_path / "cache" / "registry.json").exists()


def test_register_rejects_bad_names_roles_kinds(tmp_path: Path) -> None:
    model = make_genai_dir(tmp_path / "m")
    with pytest.raises(ModelRegistryError, match="built in"):
        register_model(NGRAM, "draft", "ort-genai", model, tmp_path)
    with pytest.raises(ModelRegistryError, match="built in"):
        register_model("x", "draft", "ngram", model, tmp_path)
    with pytest.raises(ModelRegistryError, match="role"):
        register_model("x", "verifier", "ort-genai", model, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ModelRegistryError, match="kind"):
        register_model("x", "draft", "gguf", model, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ModelRegistryError, match="drafts only"):
        register_model("x", "target", "ort-genai", model, tmp_path)
    with pytest.raises(ModelRegistryError, match="bad model name"):
        register_model("a/b", "draft", "ort-genai", model, tmp_path)


def test_entry_checks_paths_per_kind() -> None:
    with pytest.raises(ModelRegistryError, match="needs a path"):
        ModelEntry("t", "target", "hf", None)
    with pytest.raises(ModelRegistryError, match="no path"):
        ModelEntry("n", "draft", "ngram", Path("/x"))


def test_unknown_model_error_names_known_models_and_prepare(tmp_path: Path) -> None:
    register_model("mine", "draft", "ort-genai", make_genai_dir(tmp_path / "m"), tmp_path)
    with pytest.raises(ModelRegistryError) as info:
        get_model(DEFAULT_TARGET, tmp_path)
    message = str(info.value)
    assert DEFAULT_TARGET in message
    assert "mine" in message and NGRAM in message
    assert "sled models prepare" in message


def test_registered_dir_that_vanished_is_reported(tmp_path: Path) -> None:
    model = make_genai_dir(tmp_path / "m")
    register_model("m", "draft", "ort-genai", model, tmp_path)
    (model / "genai_config.json").unlink()
    model.rmdir()
    with pytest.raises(ModelRegistryError, match=r"missing.*sled models prepare"):
        get_model("m", tmp_path)


def test_ngram_needs_no_files(tmp_path: Path) -> None:
    assert get_model(NGRAM, tmp_path).path is None


def test_corrupt_registry_gives_clear_error(tmp_path: Path) -> None:
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(ModelRegistryError, match="cannot read model registry"):
        load_registry(tmp_path)
    (tmp_path / "registry.json").write_text('{"version": 7, "models": {}}')
    with pytest.raises(ModelRegistryError, match="unsupported version 7"):
        load_registry(tmp_path)


def test_write_is_atomic_when_replace_fails(tmp_path: Path, monkeypatch) -> None:
    register_model("a", "target", "hf", make_hf_dir(tmp_path / "a"), tmp_path)
    before = (tmp_path / "registry.json").read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(registry.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        register_model("b", "draft", "ort-genai", make_genai_dir(tmp_path / "b"), tmp_path)
    assert (tmp_path / "registry.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "registry.json"]


def test_registry_file_is_world_readable(tmp_path: Path) -> None:
    register_model("a", "target", "hf", make_hf_dir(tmp_path / "a"), tmp_path)
    assert os.stat(tmp_path / "registry.json").st_mode & 0o777 == 0o644


def test_tokenizer_dir_is_default_target(tmp_path: Path) -> None:
    with pytest.raises(ModelRegistryError, match="sled models prepare"):
        tokenizer_dir(tmp_path)
    target = make_hf_dir(tmp_path / "t")
    register_model(DEFAULT_TARGET, "target", "hf", target, tmp_path)
    assert tokenizer_dir(tmp_path) == target.resolve()
    (target / "tokenizer.json").unlink()
    with pytest.raises(ModelRegistryError, match=r"no tokenizer\.json"):
        tokenizer_dir(tmp_path)


def test_default_cache_comes_from_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLED_MODEL_CACHE", str(tmp_path))
    register_model(DRAFT_INT4, "draft", "ort-genai", make_genai_dir(tmp_path / "d"))
    assert (tmp_path / "registry.json").is_file()
    assert get_model(DRAFT_INT4).path == (tmp_path / "d").resolve()
