"""Draft backends, one module each, chosen by the model entry's kind.

A backend module is imported only when a model of its kind is loaded, so a
device running the n-gram drafter never loads onnxruntime.
"""

from __future__ import annotations

import importlib
import inspect

from sled_shared.models.registry import ModelEntry

from sled_drafter.backends.base import Draft, DraftBackend, DraftError, DraftSession

__all__ = ["BACKENDS", "Draft", "DraftBackend", "DraftError", "DraftSession", "load_backend"]

# kind -> (module, class); the class offers from_entry(entry, **options).
BACKENDS: dict[str, tuple[str, str]] = {
    "ngram": ("sled_drafter.backends.ngram", "NgramBackend"),
    "ort-genai": ("sled_drafter.backends.ort_genai", "OrtGenaiBackend"),
}


def load_backend(entry: ModelEntry, **options: int) -> DraftBackend:
    """The backend serving `entry`; `options` go to its constructor (e.g. max_length)."""
    if entry.role != "draft":
        raise DraftError(f"model {entry.name!r} is a {entry.role}, not a draft model")
    target = BACKENDS.get(entry.kind)
    if target is None:
        raise DraftError(
            f"model {entry.name!r} has kind {entry.kind!r}, which the drafter cannot run "
            f"(known: {', '.join(sorted(BACKENDS))})"
        )
    module_name, class_name = target
    backend_cls = getattr(importlib.import_module(module_name), class_name)
    try:
        inspect.signature(backend_cls).bind_partial(**options)
    except TypeError as exc:
        raise DraftError(f"bad options for a {entry.kind} backend: {exc}") from None
    return backend_cls.from_entry(entry, **options)
