from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from sled_shared.launcher import Launcher, LaunchError, ServiceSpec, default_stack

FAKE = str(Path(__file__).with_name("fake_stack_service.py"))


def fake(name: str, out: Path, *, mode: str = "ok", openai: bool = False, **env: str):
    env = {"FAKE_NAME": name, "FAKE_OUT_DIR": str(out), "FAKE_MODE": mode, **env}
    return ServiceSpec(name, (sys.executable, FAKE), env, openai)


def record(out: Path, name: str, timeout: float = 10.0) -> dict:
    path = out / f"{name}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{name} wrote no record"
        time.sleep(0.05)
    return json.loads(path.read_text())


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_starts_services_and_stops_them_with_no_orphans(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    specs = [
        fake("verifier", out),
        fake("pi5-int4", out, openai=True, SLED_DRAFT_MODEL="smollm2-135m-int4",
             SLED_DEVICE_NAME="pi5-int4"),
    ]  # fmt: skip
    user_env = {
        **os.environ,
        "SLED_GPU_KV_BLOCKS": "7",
        "SLED_SCHED_POLICY": "neo",
        "SLED_MODEL_CACHE": str(tmp_path / "cache"),
        "SLED_METRICS_PORT": "1",  # the launcher's own choice wins
    }
    launcher = Launcher(specs, log_dir=tmp_path / "logs", environ=user_env)
    try:
        endpoints = launcher.start()
        pids = dict(launcher.pids)
        recs = {name: record(out, name) for name in ("verifier", "pi5-int4")}
    finally:
        launcher.stop()
        stopped_at = time.monotonic()

    kinds = [(e.service, e.kind) for e in endpoints]
    assert kinds == [("nats", "nats"), ("nats", "monitor"), ("verifier", "metrics"),
                     ("pi5-int4", "openai"), ("pi5-int4", "metrics")]  # fmt: skip
    urls = {(e.service, e.kind): e.url for e in endpoints}
    assert urls["nats", "nats"].startswith("nats://127.0.0.1:")
    for name, rec in recs.items():
        env = rec["env"]
        assert env["SLED_NATS_URL"] == urls["nats", "nats"]
        assert urls[name, "metrics"] == f"http://127.0.0.1:{env['SLED_METRICS_PORT']}/metrics"
        assert env["SLED_GPU_KV_BLOCKS"] == "7" and env["SLED_SCHED_POLICY"] == "neo"
        assert env["SLED_MODEL_CACHE"] == str(tmp_path / "cache")
        assert rec["pid"] == pids[name]
    drafter_env = recs["pi5-int4"]["env"]
    assert urls["pi5-int4", "openai"] == f"http://127.0.0.1:{drafter_env['SLED_HTTP_PORT']}"
    assert drafter_env["SLED_DRAFT_MODEL"] == "smollm2-135m-int4"
    assert "SLED_HTTP_PORT" not in recs["verifier"]["env"]

    everyone = [*pids.values(), *(r["child"] for r in recs.values())]
    assert wait_gone(everyone, timeout=5) == []
    assert time.monotonic() - stopped_at < 5
    assert launcher.pids == {}


def test_endpoints_answer_while_running(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    specs = [fake("pi5-int4", out, openai=True, FAKE_CHILD="0")]
    with Launcher(specs, log_dir=tmp_path / "logs") as launcher:
        urls = {(e.service, e.kind): e.url for e in launcher.endpoints}
        status, text = get(urls["pi5-int4", "metrics"])
        assert status == 200 and "# TYPE" in text
        status, text = get(urls["pi5-int4", "metrics"].replace("/metrics", "/readyz"))
        assert status == 200 and json.loads(text)["checks"] == {"model": True, "nats": True}
        assert get(urls["pi5-int4", "openai"] + "/healthz")[0] == 200
        assert get(urls["nats", "monitor"] + "/healthz")[0] == 200
        launcher.check()


def test_dying_service_is_named_with_its_log_and_the_rest_is_stopped(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    specs = [fake("verifier", out), fake("orin-int8", out, mode="crash")]
    launcher = Launcher(specs, log_dir=tmp_path / "logs")
    with pytest.raises(LaunchError) as err:
        launcher.start()
    message = str(err.value)
    assert "orin-int8" in message and "status 3" in message
    assert "kaboom: model file missing" in message
    rec = record(out, "verifier")
    assert wait_gone([rec["pid"], rec["child"]]) == []
    assert launcher.nats is None and launcher.running == []


def test_service_never_ready_times_out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    specs = [fake("verifier", out, mode="never_ready")]
    launcher = Launcher(specs, log_dir=tmp_path / "logs", ready_timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(LaunchError, match="verifier not ready"):
        launcher.start()
    assert 1.5 <= time.monotonic() - started < 10
    rec = record(out, "verifier")
    assert wait_gone([rec["pid"], rec["child"]]) == []


def test_service_ignoring_sigterm_is_killed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    launcher = Launcher(
        [fake("verifier", out, mode="stubborn")], log_dir=tmp_path / "logs", stop_timeout_s=0.5
    )
    launcher.start()
    rec = record(out, "verifier")
    started = time.monotonic()
    launcher.stop()
    assert 0.5 <= time.monotonic() - started < 5
    assert wait_gone([rec["pid"], rec["child"]], timeout=2) == []


def test_uses_the_given_nats_url(tmp_path, nats_url):
    out = tmp_path / "out"
    out.mkdir()
    with Launcher([fake("verifier", out, FAKE_CHILD="0")], log_dir=tmp_path / "logs",
                  nats_url=nats_url) as launcher:  # fmt: skip
        assert launcher.nats is None and "nats" not in launcher.pids
        assert record(out, "verifier")["env"]["SLED_NATS_URL"] == nats_url
        first = launcher.endpoints[0]
        assert (first.kind, first.url) == ("nats", nats_url)
        assert "monitor" not in [e.kind for e in launcher.endpoints]


def test_default_stack_is_scheduler_kvoffload_verifier_and_three_drafters():
    stack = default_stack()
    assert [s.name for s in stack] == [
        "scheduler", "kvoffload", "verifier", "pi5-int4", "orin-int8", "phone-ngram",
    ]  # fmt: skip
    server = {s.name: s.argv[1:] for s in stack[:3] if not s.openai}
    assert server == {"scheduler": ("-m", "sled_scheduler"), "kvoffload": ("-m", "sled_kvoffload"),
                      "verifier": ("-m", "sled_verifier")}  # fmt: skip
    models = {s.name: s.env["SLED_DRAFT_MODEL"] for s in stack[3:]}
    assert models == {"pi5-int4": "smollm2-135m-int4", "orin-int8": "smollm2-135m-int8",
                      "phone-ngram": "ngram"}  # fmt: skip
    assert all(s.openai and s.argv[1:] == ("-m", "sled_drafter") for s in stack[3:])
    assert all(s.env["SLED_DEVICE_NAME"] == s.name for s in stack[3:])
    lean = default_stack(("verifier", "kvoffload"), [("a", "ngram")])
    assert [s.name for s in lean] == ["kvoffload", "verifier", "a"]
    with pytest.raises(ValueError, match="unknown services"):
        default_stack(("verifier", "gpu-farm"))


# `sled up` itself, as a real process: the launcher in cli_up.serve() with fake services.
UP_SCRIPT = """
import sys
from pathlib import Path
from sled_shared.cli_up import serve
from sled_shared.launcher import Launcher, ServiceSpec
out, fake, child = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
env = {"FAKE_OUT_DIR": str(out), "FAKE_CHILD": child}
specs = [ServiceSpec(n, (sys.executable, fake), {**env, "FAKE_NAME": n}, n != "verifier")
         for n in ("verifier", "phone-ngram")]
sys.exit(serve(Launcher(specs, log_dir=out / "logs", stop_timeout_s=5)))
"""


def start_up(out: Path, child: str) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", UP_SCRIPT, str(out), FAKE, child],
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    deadline = time.monotonic() + 60
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        lines.append(line.strip())
        assert time.monotonic() < deadline
    assert line.strip() == "ready", f"sled up ended early: {lines}"
    return proc, lines


def nats_pid(out: Path) -> int:
    (ports,) = (out / "logs" / "nats").glob("nats-server_*.ports")
    return int(ports.stem.rsplit("_", 1)[1])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sled_up_stops_everything_on_signal(tmp_path, sig):
    proc, lines = start_up(tmp_path, child="1")
    try:
        assert lines[0].split() == ["nats", "nats", lines[0].split()[2]]
        assert lines[0].split()[2].startswith("nats://127.0.0.1:")
        assert [ln.split()[:2] for ln in lines[1:]] == [
            ["nats", "monitor"], ["verifier", "metrics"], ["phone-ngram", "openai"],
            ["phone-ngram", "metrics"], ["logs", "dir"],
        ]  # fmt: skip
        recs = [record(tmp_path, n) for n in ("verifier", "phone-ngram")]
        pids = [nats_pid(tmp_path), *(r["pid"] for r in recs), *(r["child"] for r in recs)]
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert proc.stdout.read().strip() == "stopped"
        assert wait_gone(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_killed_launcher_takes_its_children_along(tmp_path):
    # SIGKILL gives the launcher no chance to clean up; the kernel's
    # parent-death signal still stops the services and NATS.
    proc, _ = start_up(tmp_path, child="0")
    pids = [nats_pid(tmp_path), *(record(tmp_path, n)["pid"] for n in ("verifier", "phone-ngram"))]
    proc.kill()
    proc.wait()
    assert wait_gone(pids) == []
