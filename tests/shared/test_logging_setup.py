from __future__ import annotations

import io
import json
import logging

import pytest
from sled_shared.logging_setup import setup_logging


@pytest.fixture
def restore_root():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_extra_fields_and_tracebacks(restore_root):
    out = io.StringIO()
    setup_logging("info", "json", service="verifier", stream=out)
    log = logging.getLogger("sled.test")
    log.debug("hidden")
    log.info("round %d done", 7, extra={"session_id": "s-1"})
    try:
        raise ValueError("bad round")
    except ValueError:
        log.exception("failed")
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "round 7 done" and first["level"] == "info"
    assert first["service"] == "verifier" and first["session_id"] == "s-1"
    assert second["level"] == "error" and "ValueError: bad round" in second["exc"]


def test_text_format_and_reconfiguring_replaces_the_handler(restore_root):
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=io.StringIO())
    setup_logging("WARNING", "text", stream=out)
    logging.getLogger("sled.test").warning("careful")
    logging.getLogger("sled.test").info("hidden")
    assert out.getvalue().rstrip().endswith("WARNING sled.test: careful")
    assert len(out.getvalue().splitlines()) == 1


@pytest.mark.parametrize(("level", "fmt"), [("LOUD", "json"), ("INFO", "xml")])
def test_bad_settings_are_rejected(level, fmt, restore_root):
    with pytest.raises(ValueError):
        setup_logging(level, fmt)
