"""`sled models list|register` and the CLI skeleton (lazy imports, one-line errors)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from sled_shared.cli import COMMANDS, main


def test_every_command_module_is_importable_and_registers(capsys) -> None:
    from sled_shared.cli import build_parser

    parser = build_parser()
    names = {name for name, _ in COMMANDS}
    assert "models" in names
    for name in names:
        # Parsing `<name> --help` exits 0 only if the module added that subcommand.
        with pytest.raises(SystemExit) as info:
            parser.parse_args([name, "--help"])
        assert info.value.code == 0


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from sled_shared.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = ('torch', 'transformers', 'onnxruntime', 'onnxruntime_genai', 'gguf', 'tqdm')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == ""


def test_register_then_list(tmp_path: Path, capsys) -> None:
    model = tmp_path / "draft"
    model.mkdir()
    (model / "genai_config.json").write_text("{}")
    cache = str(tmp_path / "cache")
    argv = ["models", "register", "--name", "mine", "--role", "draft", "--kind", "ort-genai"]
    assert main([*argv, "--path", str(model), "--cache", cache]) == 0
    assert "registered mine (draft, ort-genai)" in capsys.readouterr().out

    assert main(["models", "list", "--cache", cache]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["NAME", "ROLE", "KIND", "STATUS", "PATH"]
    assert ["mine", "draft", "ort-genai", "ok", str(model.resolve())] in [r.split() for r in rows]
    assert ["ngram", "draft", "ngram", "ok", "-"] in [r.split() for r in rows]

    (model / "genai_config.json").unlink()
    model.rmdir()
    assert main(["models", "list", "--cache", cache]) == 0
    assert "missing" in capsys.readouterr().out


def test_bad_register_is_one_line_error(tmp_path: Path, capsys) -> None:
    argv = ["models", "register", "--name", "x", "--role", "target", "--kind", "hf"]
    code = main([*argv, "--path", str(tmp_path / "nope"), "--cache", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("sled: error: models register:")
    assert "does not exist" in err
    assert err.count("\n") == 1


def test_group_without_action_prints_usage(capsys) -> None:
    assert main(["models"]) == 2
    assert "prepare" in capsys.readouterr().out


def test_python_dash_m_entry_reports_errors_cleanly(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sled_shared", "models", "register", "--name", "x",
         "--role", "draft", "--kind", "ort-genai", "--path", str(tmp_path), "--cache",
         str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 1
    assert "genai_config.json missing" in out.stderr
    assert "Traceback" not in out.stderr
