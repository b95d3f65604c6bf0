"""Which models the cache holds: `<cache>/registry.json`.

The file maps a model name to its role (target or draft), kind (how to load
it) and directory. The n-gram drafter needs no files, so it is always
present whatever the file says.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from sled_shared.paths import model_cache_dir

Role = Literal["target", "draft"]
Kind = Literal["hf", "ort-genai", "ngram"]

ROLES: tuple[str, ...] = get_args(Role)
KINDS: tuple[str, ...] = get_args(Kind)

DEFAULT_TARGET = "smollm2-135m"
DRAFT_INT4 = "smollm2-135m-int4"
DRAFT_INT8 = "smollm2-135m-int8"
NGRAM = "ngram"

REGISTRY_FILE = "registry.json"
REGISTRY_VERSION = 1
# The weight files transformers can load from a local HF directory.
HF_WEIGHT_PATTERNS: tuple[str, ...] = ("*.safetensors", "pytorch_model*.bin", "model*.bin")


class ModelRegistryError(ValueError):
    """Bad registry input or a model the cache does not hold."""


@dataclass(frozen=True, slots=True)
class ModelEntry:
    name: str
    role: Role
    kind: Kind
    path: Path | None  # model directory; None for "ngram"

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or "/" in self.name:
            raise ModelRegistryError(f"bad model name {self.name!r}: non-empty, no '/', no spaces")
        if self.role not in ROLES:
            raise ModelRegistryError(f"model {self.name!r}: role {self.role!r} not in {ROLES}")
        if self.kind not in KINDS:
            raise ModelRegistryError(f"model {self.name!r}: kind {self.kind!r} not in {KINDS}")
        if self.kind == "ngram":
            if self.path is not None or self.role != "draft":
                raise ModelRegistryError(f"model {self.name!r}: ngram is a draft with no path")
        elif self.path is None:
            raise ModelRegistryError(f"model {self.name!r}: kind {self.kind!r} needs a path")
        if self.kind == "ort-genai" and self.role != "draft":
            raise ModelRegistryError(f"model {self.name!r}: ort-genai models serve as drafts only")

    def to_json(self) -> dict[str, str | None]:
        return {"role": self.role, "kind": self.kind, "path": str(self.path) if self.path else None}


NGRAM_ENTRY = ModelEntry(NGRAM, "draft", "ngram", None)


def _cache(cache: Path | None) -> Path:
    return Path(cache).expanduser().resolve() if cache is not None else model_cache_dir()


def registry_path(cache: Path | None = None) -> Path:
    return _cache(cache) / REGISTRY_FILE


def _read_file(cache: Path) -> dict[str, ModelEntry]:
    path = cache / REGISTRY_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != REGISTRY_VERSION:
            raise ModelRegistryError(f"unsupported version {data.get('version')!r}")
        return {
            name: ModelEntry(
                name,
                raw["role"],
                raw["kind"],
                Path(raw["path"]) if raw.get("path") else None,
            )
            for name, raw in data["models"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelRegistryError(
            f"cannot read model registry {path}: {exc}; fix or delete it and run "
            "`sled models prepare`"
        ) from exc


def _write_file(cache: Path, entries: dict[str, ModelEntry]) -> None:
    """Write the registry atomically: readers see the old file or the new one."""
    cache.mkdir(parents=True, exist_ok=True)
    models = {n: e.to_json() for n, e in sorted(entries.items()) if e.kind != "ngram"}
    text = json.dumps({"version": REGISTRY_VERSION, "models": models}, indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".tmp", dir=cache)
    try:
        # mkstemp makes owner-only files; services may read the cache as another user.
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache / REGISTRY_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_registry(cache: Path | None = None) -> dict[str, ModelEntry]:
    """Every known model by name; always includes `ngram`."""
    entries = _read_file(_cache(cache))
    entries[NGRAM] = NGRAM_ENTRY
    return entries


def get_model(name: str, cache: Path | None = None) -> ModelEntry:
    root = _cache(cache)
    entries = load_registry(root)
    entry = entries.get(name)
    if entry is None:
        known = ", ".join(sorted(entries))
        raise ModelRegistryError(
            f"unknown model {name!r} in cache {root} (known: {known}); run "
            "`sled models prepare` to build the default models, or `sled models register` "
            "to add your own"
        )
    if entry.path is not None and not entry.path.is_dir():
        raise ModelRegistryError(
            f"model {name!r} is registered at {entry.path}, which is missing; run "
            "`sled models prepare` (or register it again)"
        )
    return entry


def validate_model_dir(kind: Kind, path: Path) -> None:
    """Check that `path` holds a model of `kind`, with a message saying what is missing."""
    if not path.is_dir():
        raise ModelRegistryError(f"model directory {path} does not exist or is not a directory")
    if kind == "hf":
        if not (path / "config.json").is_file():
            raise ModelRegistryError(f"{path} is no Hugging Face model dir: config.json missing")
        if not any(any(path.glob(p)) for p in HF_WEIGHT_PATTERNS):
            raise ModelRegistryError(
                f"{path} has no weights: expected {' or '.join(HF_WEIGHT_PATTERNS)}"
            )
    elif kind == "ort-genai":
        if not (path / "genai_config.json").is_file():
            raise ModelRegistryError(
                f"{path} is no onnxruntime-genai model dir: genai_config.json missing"
            )
    else:
        raise ModelRegistryError(f"kind {kind!r} has no model directory to register")


def register_model(
    name: str, role: Role, kind: Kind, path: Path | str, cache: Path | None = None
) -> ModelEntry:
    """Add (or replace) a model backed by a local directory, after checking its files."""
    if name == NGRAM:
        raise ModelRegistryError(f"{NGRAM!r} is built in and cannot be registered")
    if kind == "ngram":
        raise ModelRegistryError("kind 'ngram' is built in; register hf or ort-genai dirs")
    model_dir = Path(path).expanduser().resolve()
    entry = ModelEntry(name, role, kind, model_dir)
    validate_model_dir(kind, model_dir)
    root = _cache(cache)
    entries = _read_file(root)
    entries[name] = entry
    _write_file(root, entries)
    return entry


def tokenizer_dir(cache: Path | None = None) -> Path:
    """The default target's directory; it holds tokenizer.json, which drafts share."""
    entry = get_model(DEFAULT_TARGET, cache)
    if entry.path is None or not (entry.path / "tokenizer.json").is_file():
        raise ModelRegistryError(
            f"{entry.path} has no tokenizer.json; run `sled models prepare --force`"
        )
    return entry.path
