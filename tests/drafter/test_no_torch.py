"""The drafter runs on ARM boards without torch or transformers: prove it imports and drafts."""

import pkgutil
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import sled_drafter

FORBIDDEN = ("torch", "transformers")
PYPROJECT = Path(__file__).resolve().parents[2] / "services" / "drafter" / "pyproject.toml"

SCRIPT = r"""
import importlib, importlib.abc, pkgutil, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ImportError(f"{name} is forbidden on the drafter")
        return None

sys.meta_path.insert(0, Refuse())
import sled_drafter
modules = [m.name for m in pkgutil.walk_packages(sled_drafter.__path__, "sled_drafter.")]
for name in modules:
    importlib.import_module(name)

from sled_drafter.backends import load_backend
from sled_shared.models.registry import NGRAM_ENTRY
from sled_shared.speculative import SamplingParams
draft = load_backend(NGRAM_ENTRY).open_session().propose([1, 2, 3, 1, 2], 3, SamplingParams(), 0)
assert draft.ids.tolist() == [3, 1, 2], draft.ids
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
assert not loaded, loaded
print("IMPORTED", len(modules))
"""


def test_every_module_imports_and_drafts_without_torch():
    expected = [m.name for m in pkgutil.walk_packages(sled_drafter.__path__, "sled_drafter.")]
    assert "sled_drafter.backends.ort_genai" in expected and "sled_drafter.tokenizer" in expected
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"IMPORTED {len(expected)}" in result.stdout


def test_the_guard_really_blocks_torch():
    # Without this, a broken finder would let the test above pass vacuously.
    probe = SCRIPT.split("import sled_drafter")[0] + "import torch\n"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "forbidden on the drafter" in result.stderr


def test_package_dependencies_exclude_torch():
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    deps = list(project["dependencies"])
    deps += [d for extra in project.get("optional-dependencies", {}).values() for d in extra]
    names = {re.split(r"[\s<>=!~\[;]", d, maxsplit=1)[0].lower() for d in deps}
    assert not names & set(FORBIDDEN), names
    assert {"onnxruntime-genai", "tokenizers", "jinja2", "numpy"} <= names
