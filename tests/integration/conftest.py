"""Fixtures of the real-model integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import stack as local_stack


@pytest.fixture(scope="module")
def sled_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[local_stack.LocalStack]:
    """The default `sled up` stack (embedded NATS, scheduler, kvoffload, verifier and
    the drafters pi5-int4, orin-int8, phone-ngram), one per test module.

    Stopping it must end every process it started: a survivor fails the module.
    """
    running = local_stack.start(tmp_path_factory.mktemp("sled-up"))
    try:
        yield running
    finally:
        status = local_stack.stop(running)
    survivors = running.survivors()
    assert not survivors, f"processes left after `sled up` stopped: {survivors}"
    assert status == 0, f"`sled up` exited with {status}:\n{running.log('sled-up', 20)}"
